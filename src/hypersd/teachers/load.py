"""``load_teacher``: one entry point for every backbone."""

from __future__ import annotations

from .base import Teacher
from ..errors import HypersdError

BACKBONES = ("digits", "digits-flow", "sd15", "sdxl")
# The embedded digits worlds: the same prompts, judges and pixel codec; "digits-flow" is the
# rectified-flow transformer teacher beside the DDPM UNet.
DIGITS_WORLDS = ("digits", "digits-flow")


def load_teacher(backbone: str = "digits", path: str | None = None, device="cpu", dtype=None) -> Teacher:
    """Load a teacher by backbone name.

    ``digits`` / ``digits-flow``: ``path`` is a teacher .safetensors (default: the one shipped in
    the package: the DDPM UNet, or the flow transformer).
    ``sd15`` / ``sdxl``: ``path`` is a hub id or a local diffusers folder.
    """
    if backbone == "digits":
        from .digits import DigitsTeacher

        return DigitsTeacher.load(path, device=device)
    if backbone == "digits-flow":
        from .digits_flow import FlowDigitsTeacher

        return FlowDigitsTeacher.load(path, device=device)
    if backbone in ("sd15", "sdxl"):
        from .sd import load_sd

        if not path:
            raise HypersdError(f"backbone {backbone!r} needs a model: pass a hub id or a local diffusers folder")
        return load_sd(backbone, path, device=device, dtype=dtype)
    raise HypersdError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
