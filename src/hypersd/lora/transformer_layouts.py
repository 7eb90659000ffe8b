"""kohya's layout for the SD3 and FLUX transformers: the original (BFL / SAI) layer names, fused qkv.

diffusers splits what the original models fuse: FLUX's ``double_blocks.N.img_attn.qkv`` is diffusers'
``to_q``, ``to_k``, ``to_v``; its ``single_blocks.N.linear1`` is ``to_q``, ``to_k``, ``to_v`` and
``proj_mlp`` stacked; SD3's ``joint_blocks.N.x_block.attn.qkv`` likewise. kohya's trainers, and
ComfyUI (which maps ``lora_unet_`` + every original weight name), use the fused names.

Export: the parts' LoRAs become one LoRA on the fused layer, exactly: the downs stacked
(``A = [A_q; A_k; A_v]``), the ups block-diagonal (``B = diag(B_q, B_k, B_v)``), so ``B·A`` is the
parts' ``B_i·A_i`` stacked by rows. Its rank is the sum of the parts' ranks (3r for qkv, 4r for
linear1) and its alpha grows with it, which keeps alpha/rank and so the weight change as it was.
Import: a fused LoRA whose up is block-diagonal in that way is cut back into the parts (rank r
each, exact); any other (a LoRA trained on the fused layer) gives every part the whole down and
its rows of the up: rank unchanged, also exact. Where diffusers' layer orders its rows (scale, shift)
and the original (shift, scale), the up's halves change places (``swap_halves``).
"""

from __future__ import annotations

import functools
import re

import torch

from hypersd.errors import HypersdError

KOHYA_PREFIX = "lora_unet_"

# (diffusers module, original layer, which part of the fused layer, how many parts). {0}: block.
_FLUX = [
    (r"transformer_blocks\.{0}\.attn\.to_q", "double_blocks.{0}.img_attn.qkv", 0, 3),
    (r"transformer_blocks\.{0}\.attn\.to_k", "double_blocks.{0}.img_attn.qkv", 1, 3),
    (r"transformer_blocks\.{0}\.attn\.to_v", "double_blocks.{0}.img_attn.qkv", 2, 3),
    (r"transformer_blocks\.{0}\.attn\.add_q_proj", "double_blocks.{0}.txt_attn.qkv", 0, 3),
    (r"transformer_blocks\.{0}\.attn\.add_k_proj", "double_blocks.{0}.txt_attn.qkv", 1, 3),
    (r"transformer_blocks\.{0}\.attn\.add_v_proj", "double_blocks.{0}.txt_attn.qkv", 2, 3),
    (r"transformer_blocks\.{0}\.attn\.to_out\.0", "double_blocks.{0}.img_attn.proj", 0, 1),
    (r"transformer_blocks\.{0}\.attn\.to_add_out", "double_blocks.{0}.txt_attn.proj", 0, 1),
    (r"transformer_blocks\.{0}\.ff\.net\.0\.proj", "double_blocks.{0}.img_mlp.0", 0, 1),
    (r"transformer_blocks\.{0}\.ff\.net\.2", "double_blocks.{0}.img_mlp.2", 0, 1),
    (r"transformer_blocks\.{0}\.ff_context\.net\.0\.proj", "double_blocks.{0}.txt_mlp.0", 0, 1),
    (r"transformer_blocks\.{0}\.ff_context\.net\.2", "double_blocks.{0}.txt_mlp.2", 0, 1),
    (r"transformer_blocks\.{0}\.norm1\.linear", "double_blocks.{0}.img_mod.lin", 0, 1),
    (r"transformer_blocks\.{0}\.norm1_context\.linear", "double_blocks.{0}.txt_mod.lin", 0, 1),
    (r"single_transformer_blocks\.{0}\.attn\.to_q", "single_blocks.{0}.linear1", 0, 4),
    (r"single_transformer_blocks\.{0}\.attn\.to_k", "single_blocks.{0}.linear1", 1, 4),
    (r"single_transformer_blocks\.{0}\.attn\.to_v", "single_blocks.{0}.linear1", 2, 4),
    (r"single_transformer_blocks\.{0}\.proj_mlp", "single_blocks.{0}.linear1", 3, 4),
    (r"single_transformer_blocks\.{0}\.proj_out", "single_blocks.{0}.linear2", 0, 1),
    (r"single_transformer_blocks\.{0}\.norm\.linear", "single_blocks.{0}.modulation.lin", 0, 1),
    (r"proj_out", "final_layer.linear", 0, 1),
    (r"x_embedder", "img_in", 0, 1),
    (r"context_embedder", "txt_in", 0, 1),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", 0, 1),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", 0, 1),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", 0, 1),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", 0, 1),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", 0, 1),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", 0, 1),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 0, 1),
]
_SD3 = [
    (r"transformer_blocks\.{0}\.attn\.to_q", "joint_blocks.{0}.x_block.attn.qkv", 0, 3),
    (r"transformer_blocks\.{0}\.attn\.to_k", "joint_blocks.{0}.x_block.attn.qkv", 1, 3),
    (r"transformer_blocks\.{0}\.attn\.to_v", "joint_blocks.{0}.x_block.attn.qkv", 2, 3),
    (r"transformer_blocks\.{0}\.attn\.add_q_proj", "joint_blocks.{0}.context_block.attn.qkv", 0, 3),
    (r"transformer_blocks\.{0}\.attn\.add_k_proj", "joint_blocks.{0}.context_block.attn.qkv", 1, 3),
    (r"transformer_blocks\.{0}\.attn\.add_v_proj", "joint_blocks.{0}.context_block.attn.qkv", 2, 3),
    (r"transformer_blocks\.{0}\.attn\.to_out\.0", "joint_blocks.{0}.x_block.attn.proj", 0, 1),
    (r"transformer_blocks\.{0}\.attn\.to_add_out", "joint_blocks.{0}.context_block.attn.proj", 0, 1),
    (r"transformer_blocks\.{0}\.attn2\.to_q", "joint_blocks.{0}.x_block.attn2.qkv", 0, 3),
    (r"transformer_blocks\.{0}\.attn2\.to_k", "joint_blocks.{0}.x_block.attn2.qkv", 1, 3),
    (r"transformer_blocks\.{0}\.attn2\.to_v", "joint_blocks.{0}.x_block.attn2.qkv", 2, 3),
    (r"transformer_blocks\.{0}\.attn2\.to_out\.0", "joint_blocks.{0}.x_block.attn2.proj", 0, 1),
    (r"transformer_blocks\.{0}\.ff\.net\.0\.proj", "joint_blocks.{0}.x_block.mlp.fc1", 0, 1),
    (r"transformer_blocks\.{0}\.ff\.net\.2", "joint_blocks.{0}.x_block.mlp.fc2", 0, 1),
    (r"transformer_blocks\.{0}\.ff_context\.net\.0\.proj", "joint_blocks.{0}.context_block.mlp.fc1", 0, 1),
    (r"transformer_blocks\.{0}\.ff_context\.net\.2", "joint_blocks.{0}.context_block.mlp.fc2", 0, 1),
    (r"transformer_blocks\.{0}\.norm1\.linear", "joint_blocks.{0}.x_block.adaLN_modulation.1", 0, 1),
    (r"transformer_blocks\.{0}\.norm1_context\.linear", "joint_blocks.{0}.context_block.adaLN_modulation.1", 0, 1),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 0, 1),
    (r"proj_out", "final_layer.linear", 0, 1),
    (r"pos_embed\.proj", "x_embedder.proj", 0, 1),  # the patch embedding, a convolution
    (r"context_embedder", "context_embedder", 0, 1),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", 0, 1),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", 0, 1),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", 0, 1),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", 0, 1),
]
RULES = {"flux": _FLUX, "sd3": _SD3}
# the first names of each model's original layers: how a kohya file tells which model it is for
HEADS = {"flux": ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_"),
         "sd3": ("joint_blocks_", "t_embedder_", "y_embedder_", "x_embedder_")}
TRANSFORMER_HEADS = ("transformer_blocks.", "single_transformer_blocks.")


def is_transformer(modules, backbone: str | None = None) -> bool:
    """Whether peft module paths are a diffusers transformer's (SD3, FLUX), not a UNet's: by the
    backbone where it is known (a LoRA on no block, the embedders alone, says nothing), else by them."""
    if arch_of_backbone(backbone) is not None:
        return True
    return any(m.startswith(TRANSFORMER_HEADS) for m in modules)


def arch_of_backbone(backbone: str | None) -> str | None:
    """``flux`` or ``sd3`` where a backbone name (sd3, sd3.5, flux, flux-schnell, ...) says it, else None."""
    name = (backbone or "").lower()
    return next((arch for arch in RULES if name.startswith(arch)), None)


def arch_of(modules, backbone: str | None) -> str:
    """``flux`` or ``sd3`` for a transformer LoRA: from the backbone if known, else from its layers
    (only FLUX has single blocks; a LoRA on double blocks alone could be either)."""
    arch = arch_of_backbone(backbone)
    if arch is not None:
        return arch
    if any(m.startswith("single_transformer_blocks.") for m in modules):
        return "flux"
    raise HypersdError("this transformer LoRA could be for SD3 or for FLUX (it has no FLUX single blocks); "
                       "say which with --backbone sd3 or --backbone flux")


@functools.cache
def _compiled(arch: str) -> list[tuple]:
    """Each rule as (diffusers path pattern, original name, its kohya-name pattern, part, parts)."""
    return [(re.compile(d.format(r"(\d+)")), o,
             re.compile(re.escape(o.replace(".", "_")).replace(r"\{0\}", r"(\d+)")), part, n)
            for d, o, part, n in RULES[arch]]


def original_of(module: str, arch: str) -> tuple[str, int, int]:
    """(original layer, part, parts) of a diffusers module path."""
    for d, o, _, part, n in _compiled(arch):
        m = d.fullmatch(module)
        if m:
            return o.format(*m.groups()), part, n
    raise HypersdError(f"LoRA layer {module} has no {arch.upper()} original name hypersd knows "
                       f"(kohya's layout names attention, feed-forward and modulation layers); "
                       f"write it as --to diffusers or train without that layer")


def parts_of(kohya_stem: str, arch: str) -> list[str] | None:
    """The diffusers module paths of an original layer, in kohya's underscored naming
    (``double_blocks_0_img_attn_qkv``), in their order in the fused weight; None: not one we know."""
    for _, o, k, _, _ in _compiled(arch):
        m = k.fullmatch(kohya_stem)
        if m:
            rules = sorted((r for r in RULES[arch] if r[1] == o), key=lambda r: r[2])
            return [d.replace("\\", "").format(*m.groups()) for d, *_ in rules]
    return None


def outside_the_blocks(modules) -> list[str]:
    """The layers of a transformer LoRA that are in no block (embedders, norm_out, proj_out): diffusers'
    (0.42) kohya FLUX reader converts them but leaves them out of what it loads, without a word."""
    return sorted(m for m in modules if not m.startswith(TRANSFORMER_HEADS))


def arch_of_kohya(names) -> str | None:
    """``flux`` or ``sd3`` when kohya layer names are a transformer's original ones, else None."""
    stems = [n[len(KOHYA_PREFIX):] for n in names if n.startswith(KOHYA_PREFIX)]
    for arch, heads in HEADS.items():
        if any(s.startswith(heads) for s in stems):
            return arch
    return None


# -- export -------------------------------------------------------------------------------------
def fuse(modules: dict[str, dict[str, torch.Tensor]], arch: str, alpha: float) -> dict[str, torch.Tensor]:
    """kohya tensors (``lora_unet_<original>.lora_down/.lora_up/.alpha``) of peft modules."""
    groups: dict[str, dict[int, tuple[str, int]]] = {}
    for module in modules:
        orig, part, n = original_of(module, arch)
        groups.setdefault(orig, {})[part] = (module, n)
    out = {}
    for orig, parts in groups.items():
        n = next(iter(parts.values()))[1]
        pairs = [modules[parts[i][0]] if i in parts else None for i in range(n)]
        rank = next(p["A"].shape[0] for p in pairs if p is not None)
        if n == 1:  # as it is (a convolution's 4-d A and B included)
            module = parts[0][0]
            down, up = pairs[0]["A"], swap_halves(module, pairs[0]["B"], pairs[0]["A"].shape[1])
        else:
            down, up = _stack(pairs, orig, [parts[i][0] if i in parts else None for i in range(n)])
        # alpha/rank as each part had it: the fused rank is n parts' ranks
        layer_alpha = alpha * down.shape[0] / rank
        if arch == "flux" and orig.startswith("final_layer."):
            # diffusers' kohya FLUX reader drops these two layers' alphas (takes alpha = rank): fold it in
            up, layer_alpha = (up.float() * (layer_alpha / down.shape[0])).to(up.dtype), float(down.shape[0])
        name = KOHYA_PREFIX + orig.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(layer_alpha, dtype=down.dtype)
    return out


# diffusers' AdaLayerNormContinuous (FLUX's and SD3's norm_out, the context modulation of SD3's last
# block) orders its rows (scale, shift), the original layer (shift, scale): the up's halves change
# places, both ways. Only such a layer has two halves of rows (the other modulations have 3, 6 or 9).
_HALVES = ("norm_out.linear", "norm1_context.linear")


def swap_halves(module: str, up: torch.Tensor, width: int) -> torch.Tensor:
    if module.endswith(_HALVES) and up.shape[0] == 2 * width:
        return torch.cat(up.chunk(2)[::-1])
    return up


def _stack(pairs, orig: str, names) -> tuple[torch.Tensor, torch.Tensor]:
    """Downs stacked, ups block-diagonal; a part the LoRA lacks is a zero block of its shape."""
    present = [p for p in pairs if p is not None]
    if len(present) == len(pairs):
        return torch.cat([p["A"] for p in pairs], 0), torch.block_diag(*[p["B"] for p in pairs])
    if len(pairs) == 4 and pairs[3] is None:  # linear1's MLP rows: their count is not in the LoRA
        raise HypersdError(f"{orig} fuses to_q, to_k, to_v and proj_mlp, and this LoRA lacks proj_mlp; "
                           f"kohya's layout needs all four: train with lora_targets: transformer")
    r, width = present[0]["A"].shape
    rows = next((p["B"].shape[0] for p in pairs[:3] if p is not None), width)
    filled = [p if p is not None else {"A": present[0]["A"].new_zeros(r, width),
                                       "B": present[0]["B"].new_zeros(rows, r)} for p in pairs]
    return torch.cat([p["A"] for p in filled], 0), torch.block_diag(*[p["B"] for p in filled])


# -- import -------------------------------------------------------------------------------------
def split(stem: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
          arch: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
    """(A, B, alpha) per diffusers module of one kohya layer; None: not an original name we know."""
    modules = parts_of(stem, arch)
    if modules is None:
        return None
    n = len(modules)
    if n == 1:
        return {modules[0]: (down, swap_halves(modules[0], up, down.shape[1]), alpha)}
    rows = _rows(up.shape[0], down.shape[1], n, stem)
    rank = down.shape[0]
    if rank % n == 0 and _block_diagonal(up, rows, rank // n):
        r, out, start = rank // n, {}, 0
        for i, module in enumerate(modules):
            out[module] = (down[i * r:(i + 1) * r].contiguous(),
                           up[start:start + rows[i], i * r:(i + 1) * r].contiguous(), alpha * r / rank)
            start += rows[i]
        return out
    return {module: (down, b.contiguous(), alpha) for module, b in zip(modules, torch.split(up, rows, 0))}


def _rows(total: int, width: int, n: int, stem: str) -> list[int]:
    if n == 3:
        if total % 3:
            raise HypersdError(f"kohya layer {stem}: a fused qkv LoRA must have 3·d output rows, not {total}")
        return [total // 3] * 3
    if total <= 3 * width:  # linear1: q, k, v of the model's width, then the MLP's rows
        raise HypersdError(f"kohya layer {stem}: linear1 has {total} output rows, too few for q, k, v of width {width}")
    return [width, width, width, total - 3 * width]


def _block_diagonal(up: torch.Tensor, rows: list[int], r: int) -> bool:
    start = 0
    for i, size in enumerate(rows):
        block = up[start:start + size]
        if block[:, :i * r].any() or block[:, (i + 1) * r:].any():
            return False
        start += size
    return True
