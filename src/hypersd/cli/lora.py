"""``hypersd lora``: convert a LoRA between layouts, merge two, fuse one into a model folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hypersd.errors import HypersdError

# layouts.FORMATS, spelled out so that building the command line imports no torch
FORMATS = ("hypersd", "diffusers", "kohya")
BACKBONES = ("sd15", "sdxl")
DTYPES = ("float32", "float16", "bfloat16")


def cmd_convert(a) -> None:
    from hypersd.lora.layouts import read_any, write

    state, meta = read_any(a.src)
    if a.backbone:  # names the model where the layers alone cannot (SD3 or FLUX double blocks)
        meta = {**meta, "backbone": a.backbone}
    path = write(a.out, state, meta, a.to, force=a.force)
    print(f"wrote {path} ({a.to}, rank {meta['rank']}, {len(state) // 2} layers)")
    if a.to == "kohya":
        _say_what_diffusers_leaves_out(state, meta)


def _say_what_diffusers_leaves_out(state, meta) -> None:
    from hypersd.lora.transformer_layouts import (
        arch_of,
        is_transformer,
        outside_the_blocks,
    )

    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    if not is_transformer(modules, meta.get("backbone")) or arch_of(modules, meta.get("backbone")) != "flux":
        return
    left_out = outside_the_blocks(modules)
    if left_out:
        print(f"note: diffusers' kohya FLUX reader loads the blocks only, so pipe.load_lora_weights would leave out "
              f"{len(left_out)} of these layers ({', '.join(left_out[:3])}, ...); ComfyUI and hypersd load them all. "
              f"For diffusers, write --to diffusers")


def cmd_inspect(a) -> None:
    print("\n".join(describe(a.src)))


def describe(path) -> list[str]:
    """What a LoRA file is, read as every action reads it: its layout, what it adapts, rank and
    alpha, the hypersd metadata or the published recipe its name carries."""
    from hypersd.inference.recipes import published_recipe
    from hypersd.lora.layouts import read_layout
    from hypersd.lora.transformer_layouts import is_transformer

    state, meta, fmt = read_layout(path)
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    network = "transformer (SD3 / FLUX)" if is_transformer(layers, meta.get("backbone")) else "UNet (SD1.5 / SDXL)"
    lines = [f"{path}: {fmt} layout, {len(layers)} layers of a {network}, rank {meta['rank']}, alpha {meta['alpha']:g}",
             f"  e.g. {', '.join(layers[:3])}"]
    ours = {k: v for k, v in meta.items() if k not in ("rank", "alpha", "targets")}
    if ours:
        lines.append(f"  hypersd metadata: {json.dumps(ours, sort_keys=True)}")
    recipe = published_recipe(path)
    if recipe is not None:
        scale = f", LoRA scale {recipe.lora_scale:g}" if recipe.lora_scale is not None else ""
        lines.append(f"  {recipe.source}: {recipe.backbone}, {recipe.steps} steps, guidance {recipe.guidance:g}{scale}")
    return lines


def cmd_merge(a) -> None:
    from hypersd.lora.algebra import merge_states
    from hypersd.lora.layouts import read_any, write

    state_a, meta_a = read_any(a.a)
    state_b, meta_b = read_any(a.b)
    if set(state_a) == set(state_b):  # the same layers, whether named by target suffixes or by paths
        meta_b = {**meta_b, "targets": meta_a["targets"]}
    state, spec = merge_states(state_a, meta_a, state_b, meta_b, a.ratio)
    # the merged LoRA is A's (its guidance, its one-step timestep) with B added
    meta = {**meta_a, **spec, "merged": {"a": str(a.a), "b": str(a.b), "ratio": a.ratio}}
    path = write(a.out, state, meta, a.to, force=a.force)
    print(f"wrote {path} ({a.to}, A + {a.ratio:g}·B, rank {spec['rank']})")


def cmd_fuse(a) -> None:
    path = fuse_to_folder(a.backbone, a.model, a.lora, a.out, scale=a.scale, dtype=a.dtype, force=a.force)
    print(f"wrote {path}: {a.model} with {a.lora} fused into its UNet (scale {a.scale:g}); "
          f"load it as a plain diffusers {a.backbone} model")


def fuse_to_folder(backbone: str, model: str, lora_path: str, out: str | Path, scale: float = 1.0,
                   dtype: str = "float32", force: bool = False) -> Path:
    """A diffusers folder of ``model`` whose UNet has the LoRA folded into its weights.

    Written beside ``out`` and renamed into place, so a crash never leaves half a model there."""
    import torch

    from hypersd.lora.layouts import fuse_into_unet
    from hypersd.outputs import fsync_tree
    from hypersd.teachers import load_teacher

    out = Path(out)
    if out.exists() and not force:
        raise HypersdError(f"{out} already exists; pass --force to overwrite it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise HypersdError(f"{out} is a file; --out takes a folder for the fused model")
    if backbone not in BACKBONES:
        raise HypersdError(f"fuse takes backbone sd15 or sdxl, not {backbone!r}")
    if dtype not in DTYPES:
        raise HypersdError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    teacher = load_teacher(backbone, model)  # float32: the fused weights are summed at full precision
    meta = fuse_into_unet(teacher.unet, lora_path, scale)
    pipe = _pipeline(backbone, teacher)
    pipe.to(dtype=getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        note = {"lora": str(lora_path), "scale": scale, "lora_meta": meta}
        (tmp / "hypersd_fused.json").write_text(json.dumps(note, indent=1))
        fsync_tree(tmp)  # on the disk before it is renamed into place
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pipeline(backbone: str, teacher):
    """The teacher's parts as a diffusers pipeline, with the model's own scheduler."""
    import diffusers

    config = dict(teacher.scheduler_config)
    scheduler_cls = getattr(diffusers, config.get("_class_name", ""), diffusers.DDPMScheduler)
    parts = dict(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=teacher.unet,
                 scheduler=scheduler_cls.from_config(config))
    if backbone == "sd15":
        return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=teacher.text_encoder_2,
                                               tokenizer_2=teacher.tokenizer_2,
                                               force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)


def _replace_folder(new: Path, out: Path) -> None:
    """``new`` becomes ``out``; an old ``out`` is moved aside first and only deleted once ``new`` is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def add_parser(sub) -> None:
    """The ``lora`` command and its actions, on the main parser's subcommands."""
    p = sub.add_parser("lora", help="convert LoRA files between hypersd, diffusers and kohya layouts; inspect; merge; fuse",
                       description="LoRA files for every tool: hypersd's own (peft keys), diffusers' "
                                   "(pipe.load_lora_weights) and kohya's (ComfyUI, AUTOMATIC1111). Every "
                                   "action reads any of the three.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fmt_help = f"output layout: {', '.join(FORMATS)}"

    c = actions.add_parser("convert", help="write a LoRA in another layout")
    c.add_argument("src", metavar="IN", help="LoRA .safetensors in any layout")
    c.add_argument("out", metavar="OUT", help="output .safetensors")
    c.add_argument("--to", choices=FORMATS, required=True, help=fmt_help)
    c.add_argument("--backbone", help="the model the LoRA is for (sd3, flux), where its metadata does not say: "
                                      "kohya's layout names SD3's and FLUX's layers differently")
    c.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    c.set_defaults(fn=cmd_convert)

    i = actions.add_parser("inspect", help="say what a LoRA file is: its layout, layers, rank, alpha, recipe")
    i.add_argument("src", metavar="IN", help="LoRA .safetensors in any layout")
    i.set_defaults(fn=cmd_inspect)

    m = actions.add_parser("merge", help="one LoRA equal to A + R·B, exactly (the ranks add up)")
    m.add_argument("a", metavar="A", help="LoRA .safetensors; the merged LoRA keeps its metadata")
    m.add_argument("b", metavar="B", help="LoRA .safetensors adapting the same layers as A (any rank)")
    m.add_argument("--ratio", type=float, default=1.0, help="R, B's weight (default 1)")
    m.add_argument("--out", required=True, help="output .safetensors")
    m.add_argument("--to", choices=FORMATS, default="hypersd", help=fmt_help + " (default hypersd)")
    m.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    m.set_defaults(fn=cmd_merge)

    f = actions.add_parser("fuse", help="a diffusers model folder with a LoRA folded into its UNet")
    f.add_argument("--backbone", choices=BACKBONES, required=True)
    f.add_argument("--model", required=True, help="diffusers folder or hub id of the base model")
    f.add_argument("--lora", required=True, help="LoRA .safetensors in any layout")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--scale", type=float, default=1.0, help="how much of the LoRA to fold in (default 1)")
    f.add_argument("--dtype", choices=DTYPES, default="float32", help="weights of the written model")
    f.add_argument("--force", action="store_true", help="replace --out if it exists")
    f.set_defaults(fn=cmd_fuse)
