"""FP8 teacher passes: the frozen teacher's linear layers in 8-bit floats where no gradient flows.

A distillation step spends much of its compute in the teacher's passes (guided CFG pairs, the
regulariser's ODE, DMD's real score), all under ``no_grad`` with every adapter off. Those passes
read only frozen weights, so on GPUs with FP8 matrix units (compute capability 8.9 and later:
H100, L40S, RTX 4090) their linear layers can run through ``torch._scaled_mm`` in e4m3 at twice
bf16's peak. Everything that trains, or that gradients flow through (the student, the
discriminator's read of the student's sample), keeps the weights as they are; so does the EMA
target, though no gradient flows there either: it is a bootstrapped target, and FP8 there made
the digits student's one-step fd 40.3 against 32.0 (docs/RESULTS.md), where FP8 in the teacher
alone left it at 32.4.

Scaling: one scale per output channel for the weight (fixed, computed once) and one per row
for the activations (computed per call), each mapping its largest magnitude onto e4m3's 448.
The error this leaves is a few per cent per layer (``tests/test_fp8.py`` bounds it on a UNet);
it is why this is an option, off by default.
"""

from __future__ import annotations

import contextlib

import torch

from hypersd import lora
from hypersd.errors import HypersdError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
STATE = "_hypersd_fp8"  # on the UNet's __dict__: how many teacher passes are open


class _State:
    def __init__(self):
        self.depth = 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and their float32 scales, one per row (x ≈ q * scale)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(torch.nn.Linear):
    """An ``nn.Linear`` that also holds an e4m3 copy of its frozen weight, used in teacher passes.

    The copy is a plain attribute, not a buffer: it stays out of state dicts, checkpoints and
    LoRA files, and ``Module.to(dtype)`` cannot turn it back into 16-bit weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fp8_state.depth and not torch.is_grad_enabled():
            return self._fp8_forward(x)
        return super().forward(x)

    def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.device.type
        out_dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else x.dtype
        q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        # row-wise scaling takes a bf16 output on CUDA; mat2 must be column-major (the transposed copy)
        y = torch._scaled_mm(q, self._fp8_weight.t(), scale_a=scale, scale_b=self._fp8_scale,
                             out_dtype=torch.bfloat16).to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _eligible(name: str, module: torch.nn.Module) -> bool:
    # matrix dimensions of multiples of 16 are what the FP8 kernels take; LoRA's own A/B layers
    # (trained, or EMA copies) never run in a teacher pass; a weight stored quantized already
    # (quantize_base) has no 16-bit values to copy
    return (type(module) is torch.nn.Linear and "lora_" not in name and not module.weight.requires_grad
            and type(module.weight) is torch.nn.Parameter
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def check_device(device: torch.device) -> None:
    """Refuse a GPU without FP8 matrix units (the CPU emulates them: slow, but tests run there)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise HypersdError(f"fp8_teacher needs FP8 matrix units (compute capability 8.9 or later: H100, L40S, "
                           f"RTX 4090); {torch.cuda.get_device_name(device)} is {major}.{minor}. "
                           "Set fp8_teacher: false")


def enable(unet: torch.nn.Module) -> int:
    """Give each eligible frozen linear layer its FP8 copy; returns how many. Call it once the
    UNet's weights are on their device and final (the copies are not refreshed)."""
    check_device(next(unet.parameters()).device)
    state = unet.__dict__.setdefault(STATE, _State())
    n = 0
    for name, m in unet.named_modules():
        if isinstance(m, Float8Linear):
            n += 1
        elif _eligible(name, m):
            with torch.no_grad():
                q, scale = quantize_rows(m.weight)
            m.__class__ = Float8Linear
            m._fp8_weight, m._fp8_scale, m._fp8_state = q, scale.t().contiguous(), state
            n += 1
    return n


def disable(unet: torch.nn.Module) -> None:
    """Back to plain linear layers; the FP8 copies are freed."""
    for m in unet.modules():
        if isinstance(m, Float8Linear):
            m.__class__ = torch.nn.Linear
            for k in ("_fp8_weight", "_fp8_scale", "_fp8_state"):
                del m.__dict__[k]
    unet.__dict__.pop(STATE, None)


@contextlib.contextmanager
def teacher_pass(unet: torch.nn.Module):
    """A frozen teacher pass: adapters off, and the FP8 copies wherever ``enable`` made them
    (only while gradients are off: a pass that gradients flow through keeps the weights)."""
    with lora.adapters_disabled(unet):
        state = unet.__dict__.get(STATE)
        if state is None:
            yield unet
            return
        state.depth += 1
        try:
            yield unet
        finally:
            state.depth -= 1
