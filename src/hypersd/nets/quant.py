"""A quantized frozen base: the teacher's linear weights in int8, float8 or 4-bit NF4 under a float32 LoRA.

FLUX.1-dev's transformer is 11.9 B parameters, 22 GiB in bf16: on a 24 GB card the frozen base
itself has to shrink. Weight-only quantization stores each frozen linear weight in 8 bits
(torchao's int8 or float8 e4m3, one scale per output channel) or 4 bits (bitsandbytes' NF4, one
scale per 64 weights) and computes in the activations' dtype. The LoRA weights stay float32 and
are added beside the quantized layer, never into it.

Why never into it (diffusers issues #10392 and #11215, the Hyper-FLUX LoRA "having no effect" on an
FP8 FLUX): there the base was quantized by optimum-quanto, whose ``QLinear`` peft does not know,
so peft wrapped it as a plain ``nn.Linear`` and ``fuse_lora`` folded the LoRA into the quantized
weight: quanto keeps its own integer data, so the merge was lost, and even a real re-quantization
rounds a delta of the LoRA's size (Hyper-FLUX is used at scale 0.125) back onto the same 8-bit
grid points. hypersd avoids both: it quantizes only through torchao and bitsandbytes, whose
layers peft wraps with its own quantization-aware LoRA layers (``TorchaoLoraLinear``,
``Linear4bit``; ``check_wrapped`` refuses any other wrapping), quantizes before the LoRA is
attached, and ``lora.fused`` leaves the LoRA unmerged on a quantized base (the LoRA's own matmuls
run, exactly). A LoRA file holds only the LoRA's float32 weights, so it loads on the
unquantized model and on any quantized one alike (``tests/nets/test_quant.py``).
"""

from __future__ import annotations

import torch

from hypersd.errors import HypersdError

KINDS = ("none", "int8", "fp8", "nf4")
PACKAGE = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}
# bytes per weight each kind stores, scales included (int8, fp8: one float32 scale per output
# channel, negligible; nf4: 4 bits plus one absmax per 64 weights, itself 8-bit with a float32 per 256 blocks)
BYTES_PER_WEIGHT = {"none": 2.0, "int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def is_quantized_weight(weight) -> bool:
    """Whether a weight is stored quantized (a torchao tensor subclass or a bitsandbytes 4-bit one)."""
    name = type(weight).__module__
    return name.startswith(("torchao", "bitsandbytes"))


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether any of ``module``'s weights is stored quantized."""
    return any(is_quantized_weight(p) for p in module.parameters())


def _eligible(module: torch.nn.Module, name: str) -> bool:
    # LoRA's own layers train (or hold an EMA copy) in float32: never theirs
    return (isinstance(module, torch.nn.Linear) and "lora_" not in name and not is_quantized_weight(module.weight)
            and not module.weight.requires_grad)


def _need(kind: str):
    package = PACKAGE[kind]
    try:
        return __import__(package)
    except ImportError:
        raise HypersdError(f"quantize_base {kind} needs {package}: pip install {package} (or pip install "
                           f"'hypersd[quant]'), or set quantize_base: none") from None


def quantize(module: torch.nn.Module, kind: str, device=None, dtype: torch.dtype | None = None) -> int:
    """Quantize ``module``'s frozen linear weights in place, each moved to ``device`` first (so a
    model loaded on the CPU reaches the GPU layer by layer, never whole in 16 bits); returns how
    many. ``dtype``: the compute dtype of NF4 layers (the activations'). Refused once a LoRA is
    attached: peft picks its quantization-aware layer when the adapter is made."""
    if kind not in KINDS:
        raise HypersdError(f"unknown quantize_base {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "none":
        return 0
    if getattr(module, "peft_config", None):
        raise HypersdError("quantize the frozen base before a LoRA is attached: peft chooses the LoRA layer "
                           "for a quantized weight when the adapter is made")
    _need(kind)
    names = [n for n, m in module.named_modules() if _eligible(m, n)]
    if kind == "nf4":
        _nf4(module, names, device, dtype)
    else:
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
        chosen = set(names)
        quantize_(module, config, filter_fn=lambda m, n: n in chosen, device=device)
    return len(names)


def _nf4(module: torch.nn.Module, names: list[str], device, dtype) -> None:
    import bitsandbytes as bnb

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=dtype or old.weight.dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, child, new.to(device or old.weight.device))  # Params4bit quantizes as it moves
    # peft's bnb dispatch picks its 4-bit LoRA layer only on a model that says it is loaded in 4 bits
    module.is_loaded_in_4bit = True


def quantize_teacher(teacher, kind: str, device, text_encoders: bool = False) -> int:
    """The teacher's denoiser quantized onto ``device`` (and its text encoders with ``text_encoders``),
    everything else of it moved there as it is; returns how many layers were quantized."""
    n = quantize(teacher.unet, kind, device, dtype=teacher.dtype)
    for name in TEXT_ENCODERS if text_encoders else ():
        encoder = getattr(teacher, name, None)
        if isinstance(encoder, torch.nn.Module):
            n += quantize(encoder, kind, device, dtype=next(encoder.parameters()).dtype)
    for part in vars(teacher).values():
        if isinstance(part, torch.nn.Module):
            _move(part, device)
    return n


def _move(module: torch.nn.Module, device) -> None:
    # Module.to on the whole: quantized weights move as themselves, the rest in their own dtype
    torch.nn.Module.to(module, device=device)


def check_wrapped(unet: torch.nn.Module) -> None:
    """Refuse a LoRA layer that peft made as a plain one around a quantized weight: its merge
    would write into the quantized storage and be lost (the fault of diffusers #10392)."""
    from peft.tuners.lora.layer import Linear as PlainLoraLinear

    for name, m in unet.named_modules():
        if type(m) is PlainLoraLinear and is_quantized_weight(m.get_base_layer().weight):
            raise HypersdError(f"{name}: peft wrapped a quantized linear layer as a plain one (a peft without "
                               f"support for {type(m.get_base_layer().weight).__name__}); update peft")
