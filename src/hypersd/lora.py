"""LoRA on the teacher's UNet (peft, through diffusers' adapter API) and switching it off."""

from __future__ import annotations

import contextlib

import torch


def has_adapters(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """The teacher pass: the same UNet with every adapter switched off."""
    if not has_adapters(unet):
        yield unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
