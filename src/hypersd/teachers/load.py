"""``load_teacher``: one entry point for every backbone."""

from __future__ import annotations

from hypersd.errors import HypersdError
from hypersd.teachers.base import Teacher

BACKBONES = ("digits", "digits-flow", "sd15", "sdxl", "sd3", "flux")
# The embedded digits worlds: the same prompts, judges and pixel codec; "digits-flow" is the
# rectified-flow transformer teacher beside the DDPM UNet.
DIGITS_WORLDS = ("digits", "digits-flow")


def digits_world_of(path: str | None) -> str:
    """The digits backbone a teacher file is for, by the kind its metadata names ("digits" for no
    file: the shipped DDPM teacher); a file of neither kind is left to the DDPM loader to refuse."""
    if not path:
        return "digits"
    from pathlib import Path

    from hypersd.outputs import read_metadata

    if not Path(path).is_file():
        return "digits"
    kind = read_metadata(path, "digits teacher").get("kind")
    return "digits-flow" if kind == "digits-flow-teacher" else "digits"


def load_teacher(backbone: str = "digits", path: str | None = None, device="cpu", dtype=None,
                 **options) -> Teacher:
    """Load a teacher by backbone name.

    ``digits`` / ``digits-flow``: ``path`` is a teacher .safetensors (default: the one shipped in
    the package: the DDPM UNet, or the flow transformer).
    ``sd15`` / ``sdxl``: ``path`` is a hub id or a local diffusers folder.
    ``sd3`` / ``flux``: ``path`` is a hub id, a local diffusers folder or one .safetensors file;
    ``options`` go to ``teachers.sd3.load_sd3`` / ``teachers.flux.load_flux`` (config,
    max_sequence_length; FLUX's resolution and guidance).
    """
    if options and backbone not in ("sd3", "flux"):
        raise HypersdError(f"backbone {backbone!r} takes no options ({', '.join(options)})")
    if backbone == "digits":
        from hypersd.teachers.digits import DigitsTeacher

        return DigitsTeacher.load(path, device=device)
    if backbone == "digits-flow":
        from hypersd.teachers.digits_flow import FlowDigitsTeacher

        return FlowDigitsTeacher.load(path, device=device)
    if backbone in ("sd15", "sdxl"):
        from hypersd.teachers.sd import load_sd

        if not path:
            raise HypersdError(f"backbone {backbone!r} needs a model: pass a hub id or a local diffusers folder")
        return load_sd(backbone, path, device=device, dtype=dtype)
    if backbone in ("sd3", "flux"):
        if not path:
            raise HypersdError(f"backbone {backbone!r} needs a model: pass a hub id, a local diffusers folder "
                               f"or a .safetensors checkpoint")
        if backbone == "sd3":
            from hypersd.teachers.sd3 import load_sd3 as load
        else:
            from hypersd.teachers.flux import load_flux as load
        return load(path, device=device, dtype=dtype, **options)
    raise HypersdError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
