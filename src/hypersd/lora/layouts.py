"""LoRA files that every tool loads: hypersd's own layout, diffusers' and kohya's.

All three hold the same weights: each adapted layer adds ``(alpha/rank)·B·A`` to its weight.

- ``hypersd``: peft's keys (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``),
  with rank, alpha and targets in the ``hypersd`` metadata (``files.save_state``).
- ``diffusers``: the same keys under ``unet.``. diffusers reads no alpha from such a file (it takes
  alpha = rank), so alpha/rank is folded into B; ``pipe.load_lora_weights(path)`` loads it.
- ``kohya``: ``lora_unet_<module path, dots as underscores>.lora_down.weight`` (A),
  ``.lora_up.weight`` (B) and ``.alpha``; a convolution's down weight keeps the kernel and its up
  weight is 1x1 (kohya's LoCon shapes, which are peft's too), so A, B and alpha are stored as they are.

Module naming of the kohya export: diffusers' module paths, for SD1.5 and for SDXL
(``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``). All three readers map it:
diffusers' kohya converter turns it back into module paths for any UNet; ComfyUI lists
``lora_unet_`` + every diffusers path of the model it runs (SD1.5 or SDXL) beside the original
UNet's paths; AUTOMATIC1111 converts it to the original UNet's blocks with 2 resnets per down block,
which SD1.5 and SDXL both have. It is also what kohya's own trainer writes for SD1.5. The original
(LDM/SGM) UNet's paths (``lora_unet_input_blocks_4_1_...``), which kohya's trainer writes for SDXL,
would tie the export to a block layout (the resnets per block, where each upsampler sits); the
diffusers paths are a plain renaming that round-trips for any UNet. Reading accepts both namings.

SD3's and FLUX's transformers (told apart from a UNet by their ``transformer_blocks`` paths):
diffusers' layout puts their keys under ``transformer.``; kohya's uses the original models' layer
names with q, k and v fused (``transformer_layouts``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from hypersd.errors import HypersdError
from hypersd.lora.adapters import (
    STUDENT,
    add_lora,
    check_state,
    has_adapters,
    lora_config,
    remove_lora,
)
from hypersd.lora.files import save_state
from hypersd.lora.transformer_layouts import (
    arch_of,
    arch_of_backbone,
    arch_of_kohya,
    fuse,
    is_transformer,
    split,
)

FORMATS = ("hypersd", "diffusers", "kohya")
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "unet."
TRANSFORMER_PREFIX = "transformer."  # SD3's and FLUX's pipelines load their network's LoRA under this
_KOHYA_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PEFT_PARTS = (".lora_A.weight", ".lora_B.weight")

# Path segments that themselves hold underscores; a kohya name is split back into segments on "_".
_JOINED = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "conv_norm_out",
    # the original UNet's names (kohya's SDXL trainer)
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
}
_SGM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
_SGM_RESNET = {("in_layers", "2"): "conv1", ("out_layers", "3"): "conv2", ("emb_layers", "1"): "time_emb_proj",
               ("skip_connection",): "conv_shortcut"}


# -- naming ----------------------------------------------------------------------------------
def kohya_name(module: str) -> str:
    return KOHYA_PREFIX + module.replace(".", "_")


def module_from_kohya(name: str, layers_per_block: int = 2) -> str:
    """The diffusers module path of a kohya layer name, in either naming.

    ``layers_per_block``: resnets per down block, which places the original UNet's numbered blocks
    (2 in SD1.5 and SDXL); unused for diffusers-named layers."""
    parts = _split(name[len(KOHYA_PREFIX):])
    if parts and parts[0] in _SGM_HEADS:
        try:
            parts = _from_sgm(parts, layers_per_block)
        except (IndexError, ValueError, KeyError):
            parts = None
        if parts is None:
            raise HypersdError(f"kohya layer {name} names no UNet layer hypersd knows; "
                               f"is it a UNet LoRA for SD1.5 or SDXL?")
    return ".".join(parts)


def _split(name: str) -> list[str]:
    tokens, out, i = name.split("_"), [], 0
    while i < len(tokens):
        for n in (3, 2, 1):
            word = "_".join(tokens[i:i + n])
            if n == 1 or word in _JOINED:
                out.append(word)
                i += n
                break
    return out


def _from_sgm(parts: list[str], per_block: int) -> list[str] | None:
    """The original UNet's numbered blocks as diffusers' named ones (None: not a layer we know)."""
    head, rest = parts[0], parts[1:]
    if head == "time_embed":
        return {"0": ["time_embedding", "linear_1"], "2": ["time_embedding", "linear_2"]}.get(rest[0])
    if head == "label_emb":
        return {("0", "0"): ["add_embedding", "linear_1"], ("0", "2"): ["add_embedding", "linear_2"]}.get(tuple(rest))
    if head == "out":
        return ["conv_out"] if rest == ["2"] else None
    if head == "middle_block":  # resnet, attention, resnet; no inner index
        where = {0: ["resnets", "0"], 1: ["attentions", "0"], 2: ["resnets", "1"]}[int(rest[0])]
        return ["mid_block", *where, *(_sgm_resnet(rest[1:]) if where[0] == "resnets" else rest[1:])]
    n, inner, tail = int(rest[0]), int(rest[1]), rest[2:]
    if head == "input_blocks":
        if n == 0:
            return ["conv_in"] if tail == [] else None
        block, j = divmod(n - 1, per_block + 1)
        if j == per_block:  # each down block's last slot is its downsampler
            return ["down_blocks", str(block), "downsamplers", "0", "conv"] if tail == ["op"] else None
    else:  # output_blocks: up blocks have one layer more than down blocks
        block, j = divmod(n, per_block + 1)
        if tail == ["conv"] and inner in (1, 2):  # the upsampler follows the resnet (and attention)
            return ["up_blocks", str(block), "upsamplers", "0", "conv"]
    side = "down_blocks" if head == "input_blocks" else "up_blocks"
    if inner == 0:
        return [side, str(block), "resnets", str(j), *_sgm_resnet(tail)]
    return [side, str(block), "attentions", str(j), *tail]


def _sgm_resnet(tail: list[str]) -> list[str]:
    return [_SGM_RESNET[tuple(tail)]]


# -- weights as (A, B, alpha) per module --------------------------------------------------------
def _modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft keys grouped by module: {module: {"A": ..., "B": ...}}; refuses anything else."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise HypersdError(f"unexpected LoRA key {key} (only lora_A/lora_B weights are handled)")
        out.setdefault(m.group(1), {})[m.group(2)] = value
    for module, pair in out.items():
        if set(pair) != {"A", "B"}:
            raise HypersdError(f"LoRA layer {module} has lora_{''.join(pair)} but not both A and B; the file is incomplete")
    return out


def _spec(state: dict[str, torch.Tensor], meta: dict) -> tuple[int, float]:
    """(rank, alpha) of a state in hypersd's layout: one rank for every layer."""
    ranks = {pair["A"].shape[0] for pair in _modules(state).values()}
    if len(ranks) != 1:
        raise HypersdError(f"LoRA layers have different ranks {sorted(ranks)}; hypersd's layout has one rank")
    rank = ranks.pop()
    return rank, float(meta.get("alpha") or rank)


def _uniform(layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[dict, int, float]:
    """(state, rank, alpha) in hypersd's layout, from per-layer (A, B, alpha).

    One rank and alpha everywhere: kept as they are. Otherwise (files that give each layer its own),
    each layer's alpha/rank is folded into B and its A and B padded with zeros to the largest rank,
    which leaves B·A as it was: one adapter of that rank, alpha = rank."""
    ranks = {a.shape[0] for a, _, _ in layers.values()}
    alphas = {alpha for _, _, alpha in layers.values()}
    state = {}
    if len(ranks) == 1 and len(alphas) == 1:
        for module, (a, b, _) in layers.items():
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b
        return state, ranks.pop(), float(alphas.pop())
    top = max(ranks)
    for module, (a, b, alpha) in layers.items():
        r = a.shape[0]
        b = (b.float() * (alpha / r)).to(b.dtype)
        state[f"{module}.lora_A.weight"] = torch.cat([a, a.new_zeros((top - r, *a.shape[1:]))], 0)
        state[f"{module}.lora_B.weight"] = torch.cat([b, b.new_zeros((b.shape[0], top - r, *b.shape[2:]))], 1)
    return state, top, float(top)


# -- hypersd layout to the others ---------------------------------------------------------------
def to_diffusers(state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Keys under ``unet.`` (a transformer's: ``transformer.``), alpha/rank folded into B
    (diffusers' loader assumes alpha = rank)."""
    rank, alpha = _spec(state, meta)
    scale = alpha / rank
    prefix = TRANSFORMER_PREFIX if is_transformer(state, meta.get("backbone")) else DIFFUSERS_PREFIX
    out = {}
    for key, value in state.items():
        if ".lora_B." in key and scale != 1:
            value = (value.float() * scale).to(value.dtype)
        out[prefix + key] = value
    return out


def to_kohya(state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """kohya's names (diffusers module paths, see the module docstring); A, B and alpha as they are.
    A transformer's: the original model's names, q, k and v fused (``transformer_layouts``)."""
    _, alpha = _spec(state, meta)
    modules = _modules(state)
    if is_transformer(modules, meta.get("backbone")):
        return fuse(modules, arch_of(modules, meta.get("backbone")), alpha)
    out = {}
    for module, pair in modules.items():
        name = kohya_name(module)
        out[f"{name}.lora_down.weight"] = pair["A"]
        out[f"{name}.lora_up.weight"] = pair["B"]
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=pair["A"].dtype)
    return out


def kohya_metadata(state: dict[str, torch.Tensor], meta: dict) -> dict[str, str]:
    """The ``ss_*`` fields kohya's trainer writes, which UIs show and filter by."""
    rank, alpha = _spec(state, meta)
    network = "networks.lora"
    if is_transformer(state, meta.get("backbone")):  # the module kohya's SD3 and FLUX trainers write
        network = f"networks.lora_{arch_of(_modules(state), meta.get('backbone'))}"
    # a fused qkv layer has 3 or 4 times this rank; every layer keeps alpha/rank
    out = {"ss_network_module": network, "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}"}
    if any(v.dim() == 4 and v.shape[-1] > 1 for k, v in state.items() if ".lora_A." in k):
        out["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": f"{alpha:g}"})
    version = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}.get(meta.get("backbone", ""))
    if version:
        out["ss_base_model_version"] = version
    return out


# -- reading ----------------------------------------------------------------------------------
def read_any(path: str | Path, layers_per_block: int = 2) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file in any of the three layouts, as (state in hypersd's peft keys, meta).

    meta holds at least rank, alpha and targets (the file's own hypersd metadata when it has
    some, else the exact module paths it adapts). ``layers_per_block``: see ``module_from_kohya``."""
    state, meta, _ = _read(path, layers_per_block)
    return state, meta


def read_layout(path: str | Path, layers_per_block: int = 2) -> tuple[dict[str, torch.Tensor], dict, str]:
    """``read_any``'s (state, meta) and the layout the file was in."""
    return _read(path, layers_per_block)


def detect_format(keys) -> str:
    """Which of the three layouts a file's tensor names are in."""
    keys = list(keys)
    if not keys:
        raise HypersdError("the file holds no tensors; it is not a LoRA")
    text = [k for k in keys if k.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder"))]
    if text:
        raise HypersdError(f"the file holds text-encoder LoRA weights ({len(text)} keys, e.g. {text[0]}); "
                           f"hypersd LoRAs adapt the UNet only: keep a copy without them")
    if all(k.startswith(KOHYA_PREFIX) and k.endswith(_KOHYA_PARTS) for k in keys):
        return "kohya"
    if all(k.endswith(_PEFT_PARTS) for k in keys):
        for prefix in (DIFFUSERS_PREFIX, TRANSFORMER_PREFIX):
            if all(k.startswith(prefix) for k in keys):
                return "diffusers"
        if not any(k.startswith((DIFFUSERS_PREFIX, TRANSFORMER_PREFIX)) for k in keys):
            return "hypersd"
    # diffusers' layout with an alpha per layer (``transformer.<module>.alpha``), which diffusers' FLUX
    # loader reads as the layer's alpha (the files of some FLUX trainers)
    for prefix in (DIFFUSERS_PREFIX, TRANSFORMER_PREFIX):
        if all(k.startswith(prefix) and k.endswith((*_PEFT_PARTS, ".alpha")) for k in keys):
            return "diffusers"
    fits = [(k.startswith(KOHYA_PREFIX) and k.endswith(_KOHYA_PARTS)) or k.endswith(_PEFT_PARTS) for k in keys]
    odd = next((k for k, fit in zip(keys, fits) if not fit), keys[0])
    raise HypersdError(f"unknown LoRA layout (e.g. key {odd}); hypersd reads its own files (peft keys), "
                       f"diffusers' (unet.* or transformer.*, .lora_A/lora_B, optionally .alpha) and kohya's "
                       f"(lora_unet_*.lora_down/lora_up/alpha)")


def _read(path, layers_per_block: int) -> tuple[dict, dict, str]:
    """(state, meta, format)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HypersdError(f"LoRA file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            header = dict(f.metadata() or {})
        raw = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged or foreign files
        raise HypersdError(f"{path} is not a readable safetensors LoRA file ({e})") from None
    try:
        ours = json.loads(header.get("hypersd", "{}")) or {}
    except json.JSONDecodeError:
        raise HypersdError(f"{path} has damaged hypersd metadata (not JSON); convert it again from its source") from None
    if not isinstance(ours, dict):
        ours = {}
    try:
        fmt = detect_format(raw)
        if fmt == "kohya":
            layers = _kohya_layers(raw, layers_per_block, ours)
        else:
            layers = _peft_layers(raw, fmt, ours, header)
    except HypersdError as e:
        raise HypersdError(f"{path}: {e}") from None
    state, rank, alpha = _uniform(layers)
    meta = {**ours, "rank": rank, "alpha": alpha,
            "targets": ours["targets"] if "targets" in ours else sorted(layers)}
    return state, meta, fmt


def _peft_layers(raw: dict, fmt: str, ours: dict, header: dict) -> dict:
    """(A, B, alpha) per module of a hypersd or diffusers file."""
    prefix = TRANSFORMER_PREFIX if next(iter(raw)).startswith(TRANSFORMER_PREFIX) else DIFFUSERS_PREFIX
    alphas = {}
    if fmt == "diffusers":
        raw = {k[len(prefix):]: v for k, v in raw.items()}
        alphas = {k[:-len(".alpha")]: v for k, v in raw.items() if k.endswith(".alpha")}
        raw = {k: v for k, v in raw.items() if not k.endswith(".alpha")}
    modules = _modules(raw)
    stray = sorted(set(alphas) - set(modules))
    if stray:
        raise HypersdError(f"LoRA alpha {prefix}{stray[0]}.alpha belongs to no layer of the file; the file is damaged")
    alpha_of = _diffusers_alphas(header, prefix, alphas) if fmt == "diffusers" else None
    layers = {}
    for module, pair in modules.items():
        r = pair["A"].shape[0]
        if fmt == "hypersd":  # without hypersd metadata: peft's and diffusers' convention, alpha = rank
            alpha = float(ours["alpha"]) if ours.get("rank") == r and ours.get("alpha") else float(r)
        else:
            alpha = alpha_of(module, r)
        layers[module] = (pair["A"], pair["B"], alpha)
    return layers


def _diffusers_alphas(header: dict, prefix: str = DIFFUSERS_PREFIX, tensors: dict | None = None):
    """alpha per module for a diffusers file: the layer's own ``.alpha`` tensor where the file has
    one; else from the adapter config diffusers may store in ``lora_adapter_metadata`` (its own
    saves); else alpha = rank (what its loader assumes)."""
    try:
        cfg = json.loads(header.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        cfg = {}
    cfg = {k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix)}
    patterns = cfg.get("alpha_pattern") or {}

    def alpha(module: str, rank: int) -> float:
        if tensors and module in tensors:
            value = tensors[module]
            if value.numel() != 1 or not value.is_floating_point():
                raise HypersdError(f"LoRA alpha {prefix}{module}.alpha is not one float (shape "
                                   f"{tuple(value.shape)}, {value.dtype}); the file is damaged")
            return float(value)
        for key, value in patterns.items():  # peft's rule: the pattern matches the path's tail
            if re.match(rf"(.*\.)?({key})$", module):
                return float(value)
        return float(cfg.get("lora_alpha") or rank)

    return alpha


def _kohya_layers(raw: dict, layers_per_block: int, ours: dict | None = None) -> dict:
    names = sorted({k.split(".", 1)[0] for k in raw})
    # no block names it a transformer's: its metadata may
    arch = arch_of_kohya(names) or arch_of_backbone((ours or {}).get("backbone"))
    if arch is not None:
        return _kohya_transformer_layers(raw, names, arch, ours or {})
    layers = {}
    for name in names:
        module = module_from_kohya(name, layers_per_block)
        if module in layers:
            raise HypersdError(f"two kohya layers name the same module {module}")
        layers[module] = _kohya_factors(raw, name)
    return layers


def _kohya_factors(raw: dict, name: str) -> tuple:
    """(down, up, alpha) of one kohya layer; kohya without ``.alpha`` means alpha = rank."""
    down, up = raw.get(f"{name}.lora_down.weight"), raw.get(f"{name}.lora_up.weight")
    if down is None or up is None:
        raise HypersdError(f"kohya layer {name} lacks its lora_down or lora_up weight; the file is incomplete")
    alpha = raw.get(f"{name}.alpha")
    return down, up, float(alpha) if alpha is not None else float(down.shape[0])


def _kohya_transformer_layers(raw: dict, names: list[str], arch: str, ours: dict) -> dict:
    """(A, B, alpha) per diffusers module of a kohya file in SD3's or FLUX's original names."""
    from hypersd.lora.adapters import TARGET_PRESETS, targets_match

    targets = ours.get("targets")
    targets = TARGET_PRESETS.get(targets, [targets]) if isinstance(targets, str) else targets
    layers = {}
    for name in names:
        down, up, alpha = _kohya_factors(raw, name)
        parts = split(name[len(KOHYA_PREFIX):], down, up, alpha, arch)
        if parts is None:
            raise HypersdError(f"kohya layer {name} names no {arch.upper()} transformer layer hypersd knows")
        for module, (a, b, part_alpha) in parts.items():
            # a fused layer's parts that hypersd filled with zeros (layers it did not train) stay out
            if targets and not targets_match(module, targets):
                continue
            if ours.get("alpha") and abs(part_alpha - ours["alpha"]) <= 1e-6 * ours["alpha"]:
                part_alpha = float(ours["alpha"])  # alpha·3r/r/3 may round off by an ulp
            layers[module] = (a, b, part_alpha)
    return layers


# -- writing ----------------------------------------------------------------------------------
def write(path: str | Path, state: dict[str, torch.Tensor], meta: dict, fmt: str, force: bool = False) -> Path:
    """``state`` (hypersd's layout) written as ``fmt``; atomic, and never over a file without ``force``."""
    from safetensors.torch import save_file

    from hypersd.outputs import atomic_path, check_writable

    if fmt not in FORMATS:
        raise HypersdError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = check_writable(path, force)
    rank, alpha = _spec(state, meta)
    targets = meta.get("targets") or sorted(_modules(state))
    meta = {**meta, "rank": rank, "alpha": alpha, "targets": targets}
    if fmt == "hypersd":
        return save_state(path, state, meta)
    if fmt == "diffusers":
        tensors, header = to_diffusers(state, meta), {"format": "pt"}
        meta = {**meta, "alpha": float(rank)}  # folded into B
    else:
        tensors, header = to_kohya(state, meta), kohya_metadata(state, meta)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**header, "hypersd": json.dumps(meta)})
    return path


# -- onto a UNet ------------------------------------------------------------------------------
def load_into_unet(unet, path: str | Path, name: str = STUDENT) -> dict:
    """A LoRA file of any layout as adapter ``name`` on ``unet``, made active; returns its meta.

    Keys and shapes are checked against the UNet first: every layer that does not fit is listed in
    one message, and the UNet is left without the adapter."""
    state, meta, _ = _read(path, getattr(unet.config, "layers_per_block", 2))
    remove_lora(unet, name)
    try:
        add_lora(unet, lora_config(meta["rank"], meta["alpha"], meta["targets"]), name)
    except (ValueError, TypeError) as e:  # peft: no target layer in this UNet, or one it cannot adapt
        example = ", ".join(sorted(_modules(state))[:3])
        raise HypersdError(f"LoRA {path} does not fit this UNet: {str(e).splitlines()[0][:160]} "
                           f"(its layers: {example}, ...); was it trained on another model?") from None
    try:
        check_state(unet, state, name, source=f"LoRA {path}")
    except HypersdError:
        remove_lora(unet, name)
        raise
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(unet, state, adapter_name=name)
    unet.set_adapter(name)
    return meta


def fuse_into_unet(unet, path: str | Path, scale: float = 1.0) -> dict:
    """Fold a LoRA file into the UNet's own weights (``scale`` times its effect); no adapter is left.

    The UNet must carry no adapters: removing the fused LoRA's layers removes every adapter's."""
    if has_adapters(unet):
        raise HypersdError(f"fuse a LoRA into a UNet without adapters (this one has {sorted(unet.peft_config)})")
    name = "fuse"
    meta = load_into_unet(unet, path, name)
    unet.fuse_lora(lora_scale=scale, adapter_names=[name])
    unet.unload_lora()  # the merged base layers stay, the LoRA layers go
    unet.__dict__.pop("_hypersd_tuner_layers", None)
    return meta
