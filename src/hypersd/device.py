"""The one place a device name (a recipe's ``device:``, a command's ``--device``) becomes a torch device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypersd.errors import HypersdError

if TYPE_CHECKING:
    import torch

AUTO = "auto"


def resolve_device(device: str | None = AUTO) -> torch.device:
    """``auto`` (or None): CUDA when torch sees a GPU, else the CPU; otherwise the device named
    (cpu, cuda, cuda:N, ...), refused in one line when torch cannot run on it."""
    import torch  # here, not above: building the command line imports no torch

    if device is None or device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HypersdError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HypersdError(f"device {device!r} asked for, but torch sees no CUDA GPU; use cpu "
                           f"(--device cpu, or device: cpu in a recipe)")
    return dev
