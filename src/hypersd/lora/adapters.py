"""LoRA adapters on the teacher's UNet (peft, through diffusers' adapter API).

The student is the teacher's UNet with the ``student`` adapter on; the teacher is the same UNet
with adapters off; the EMA target is a second adapter, ``ema``. No second UNet is ever built.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from itertools import repeat

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from hypersd.errors import HypersdError

# student; fake: DMD's fake score; average: an EMA of DMD's generator. All are adapters on the one UNet.
STUDENT, EMA, FEEDBACK, FAKE, AVERAGE = "student", "ema", "feedback", "fake", "average"

# Module-name suffixes a LoRA may target: attention, feed-forward, resnet convolutions. An entry
# "!path" leaves out the module at exactly that path, which a suffix would match too.
TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn-ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj"],
    # SD3's and FLUX's transformers (docs/LORA.md): image and context attention, both feed-forwards,
    # FLUX's single blocks (their q, k, v are to_q/to_k/to_v too); not the final projection
    # (the top-level proj_out), whose LoRA diffusers' reader of kohya's FLUX files drops
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                    "!proj_out"],
}
# the preset that fits a network when a recipe leaves lora_targets at its default
_PRESET_OF_CLASS = {"SD3Transformer2DModel": "transformer", "FluxTransformer2DModel": "transformer"}


def preset_for(network: torch.nn.Module, targets: str | list[str] = "all") -> str | list[str]:
    """``targets``, except that the default ``all`` (a UNet's layers) becomes ``transformer`` on
    SD3's and FLUX's transformers, which have none of a UNet's convolutions."""
    if targets == "all":
        return _PRESET_OF_CLASS.get(type(network).__name__, targets)
    return targets


def lora_config(rank: int, alpha: float | None = None, targets: str | list[str] = "all") -> LoraConfig:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise HypersdError(f"unknown LoRA target preset {targets!r}; use one of {sorted(TARGET_PRESETS)} or a list")
        targets = TARGET_PRESETS[targets]
    keep = [t for t in targets if not t.startswith("!")]
    # peft reads a string as one regular expression the whole path must match: exactly these paths
    leave_out = "|".join(re.escape(t[1:]) for t in targets if t.startswith("!")) or None
    # init_lora_weights=True zeroes B: a fresh LoRA leaves the teacher exactly as it was.
    return LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=keep, exclude_modules=leave_out,
                      init_lora_weights=True)


def targets_of(cfg: LoraConfig) -> list[str]:
    """The target list ``lora_config`` was given (left-out paths as "!path"), sorted."""
    left_out = cfg.exclude_modules.split("|") if isinstance(cfg.exclude_modules, str) else []
    return sorted([*cfg.target_modules, *("!" + re.sub(r"\\(.)", r"\1", p) for p in left_out)])


def targets_match(module: str, targets: list[str]) -> bool:
    """Whether peft puts a LoRA on ``module`` for this target list (``lora_config``'s rules)."""
    if "!" + module in targets:
        return False
    return any(module == t or module.endswith("." + t) for t in targets if not t.startswith("!"))


def has_adapters(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def add_lora(unet, config: LoraConfig, name: str = STUDENT) -> None:
    with warnings.catch_warnings():  # peft warns on every second adapter; several are the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        # on a torchao-quantized base peft warns that merging would fail: hypersd never merges there (fused)
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        unet.add_adapter(config, adapter_name=name)
    # peft makes an adapter in the base weights' dtype; LoRA weights train in float32 (updates
    # of 1e-4 relative size vanish in bf16), and autocast runs their matmuls in low precision anyway.
    for n, p in unet.named_parameters():
        if f".{name}." in n and "lora_" in n and p.dtype != torch.float32:
            p.data = p.data.float()
    unet.__dict__.pop("_hypersd_tuner_layers", None)


def remove_lora(unet, name: str) -> None:
    if name in getattr(unet, "peft_config", {}):
        with warnings.catch_warnings():  # "was active, now deleted": the caller activates what it needs next
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            unet.delete_adapters(name)
    unet.__dict__.pop("_hypersd_tuner_layers", None)


def spec(unet, name: str) -> dict:
    """An adapter's shape as plain data (rank, alpha, targets): enough to build it again."""
    cfg = unet.peft_config[name]
    return {"rank": cfg.r, "alpha": cfg.lora_alpha, "targets": targets_of(cfg)}


def ensure_lora(unet, name: str, rank: int, alpha: float, targets) -> None:
    """Adapter ``name`` with exactly this shape: kept if it has it, (re)built if not."""
    if name in getattr(unet, "peft_config", {}):
        if spec(unet, name) == {"rank": rank, "alpha": alpha, "targets": sorted(targets)}:
            return
        remove_lora(unet, name)
    add_lora(unet, lora_config(rank, alpha, targets), name)


def activate(unet, names: str | list[str], trainable: tuple[str, ...] = ()) -> None:
    """Make ``names`` the active adapters (their outputs add up) and only ``trainable`` train.

    peft makes every active adapter trainable; a feedback LoRA on a frozen student needs less.
    """
    names = [names] if isinstance(names, str) else list(names)
    _set_flags(_tuner_layers(unet), repeat((None, names)))
    _set_trainable(unet, tuple(trainable))


def adapter_params(unet, name: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter, in a fixed order."""
    return [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]


def get_state(unet, name: str = STUDENT) -> dict[str, torch.Tensor]:
    """One adapter's weights, keys without the adapter name (as peft saves them)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}


def set_state(unet, state: dict[str, torch.Tensor], name: str = STUDENT) -> None:
    check_state(unet, state, name)
    set_peft_model_state_dict(unet, state, adapter_name=name)


def check_state(unet, state: dict[str, torch.Tensor], name: str = STUDENT, source: str = "LoRA") -> None:
    """Keys and shapes against the UNet's adapter; one message listing every mismatch."""
    want = get_peft_model_state_dict(unet, adapter_name=name)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise HypersdError(f"{source} does not fit this UNet: " + "; ".join(parts))


def _cached(unet) -> tuple[list, list[tuple[str, torch.nn.Parameter]]]:
    """The UNet's LoRA-carrying layers and LoRA weights, found once per set of adapters:
    switching walks these, not the whole module tree."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(unet.peft_config))
    cached = unet.__dict__.get("_hypersd_tuner_layers")
    if cached is None or cached[0] != key:
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        params = [(n, p) for n, p in unet.named_parameters() if "lora_" in n]
        cached = unet.__dict__["_hypersd_tuner_layers"] = (key, layers, params, {})
    return cached[1], cached[2]


def _tuner_layers(unet) -> list:
    return _cached(unet)[0]


# What peft's ``set_adapter`` and ``enable_adapters`` leave on a layer, set here directly: those
# calls walk every adapter's modules to flip their weights' requires_grad, 12 to 19 ms a switch on
# the digits UNet (124 layers, three adapters), about a tenth of a CPU training step, which
# switches three to ten times. The flags are set instead in one pass over the cached LoRA weights.
def _flags(layers) -> list[tuple[bool, str | list[str]]]:
    """Each layer's (adapters disabled, active adapters), as ``_set_flags`` puts them back."""
    return [(layer._disable_adapters, layer._active_adapter) for layer in layers]


def _set_flags(layers, flags) -> None:
    """Each layer's flags from ``flags``, (adapters disabled, active adapters) pairs in the layers'
    order (``repeat(pair)``: the same on every layer); None leaves that flag as it is."""
    for layer, (disabled, active) in zip(layers, flags):
        if disabled is not None:
            layer._disable_adapters = disabled
        if active is not None:
            layer._active_adapter = active


def _set_trainable(unet, trainable: tuple[str, ...]) -> None:
    """Only the LoRA weights of the ``trainable`` adapters require gradients."""
    params = _cached(unet)[1]
    flags = unet.__dict__["_hypersd_tuner_layers"][3]  # by trainable set, for this set of adapters
    if trainable not in flags:
        flags[trainable] = [any(f".{t}." in n for t in trainable) for n, _ in params]
    for (_, p), flag in zip(params, flags[trainable]):
        p.requires_grad_(flag)


def active(unet) -> list[str]:
    """The adapters whose outputs the UNet adds now."""
    return list(_tuner_layers(unet)[0].active_adapters) if has_adapters(unet) else []


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """The teacher pass: the same UNet with every adapter switched off."""
    if not has_adapters(unet):
        yield unet
        return
    layers = _tuner_layers(unet)
    # as peft's enable_adapters(False): every LoRA weight frozen while off; the flags come back after
    with _trainable_kept(unet):
        _set_flags(layers, repeat((True, None)))
        _set_trainable(unet, ())
        try:
            yield unet
        finally:
            _set_flags(layers, repeat((False, None)))


@contextlib.contextmanager
def _trainable_kept(unet):
    """Which LoRA weights train, as they were on entry, restored on exit (peft's switches reset it)."""
    params = [p for _, p in _cached(unet)[1]]
    grads = [p.requires_grad for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.requires_grad_(g)


@contextlib.contextmanager
def adapter(unet, name: str | list[str]):
    """Run with adapter ``name`` active, then restore the active set and which LoRA weights train
    (peft's switch makes the active adapter trainable and all others frozen)."""
    layers = _tuner_layers(unet)
    before = active(unet)
    names = [name] if isinstance(name, str) else list(name)
    with _trainable_kept(unet):
        _set_flags(layers, repeat((None, names)))  # as peft's set_adapter: the active adapters train, the others not
        _set_trainable(unet, tuple(names))
        try:
            yield unet
        finally:
            _set_flags(layers, repeat((None, before)))


@contextlib.contextmanager
def fused(unet: torch.nn.Module):
    """The active adapters folded into the base weights, for sampling without LoRA's extra matmuls
    (on small UNets they cost as much as the UNet). The base weights are restored bit for bit after:
    peft's own unmerge subtracts, which would drift a little with every use.

    On a quantized base the adapters stay unmerged: folded into 8- or 4-bit weights, a LoRA's
    delta is rounded back onto the same grid points and lost (diffusers #10392, ``nets/quant.py``).
    On a sharded base too: each process holds a slice of the weights a merge would add to."""
    from hypersd.nets.quant import is_quantized
    from hypersd.nets.shard import is_sharded

    if not has_adapters(unet) or is_quantized(unet) or is_sharded(unet):
        yield unet
        return
    layers = _tuner_layers(unet)
    saved = [(layer.get_base_layer().weight, layer.get_base_layer().weight.detach().clone()) for layer in layers]
    names = active(unet)
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge(adapter_names=names)
        yield unet
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
        for layer in layers:
            layer.merged_adapters = []
