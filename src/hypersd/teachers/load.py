"""``load_teacher``: one entry point for every backbone."""

from __future__ import annotations

from .base import Teacher
from ..errors import HypersdError

BACKBONES = ("digits", "sd15", "sdxl", "sd3", "flux")


def load_teacher(backbone: str = "digits", path: str | None = None, device="cpu", dtype=None,
                 **options) -> Teacher:
    """Load a teacher by backbone name.

    ``digits``: ``path`` is a teacher .safetensors (default: the one shipped in the package).
    ``sd15`` / ``sdxl``: ``path`` is a hub id or a local diffusers folder.
    ``sd3`` / ``flux``: ``path`` is a hub id, a local diffusers folder or one .safetensors file;
    ``options`` go to ``teachers.sd3.load_sd3`` / ``teachers.flux.load_flux`` (config,
    max_sequence_length; FLUX's resolution and guidance).
    """
    if options and backbone not in ("sd3", "flux"):
        raise HypersdError(f"backbone {backbone!r} takes no options ({', '.join(options)})")
    if backbone == "digits":
        from .digits import DigitsTeacher

        return DigitsTeacher.load(path, device=device)
    if backbone in ("sd15", "sdxl"):
        from .sd import load_sd

        if not path:
            raise HypersdError(f"backbone {backbone!r} needs a model: pass a hub id or a local diffusers folder")
        return load_sd(backbone, path, device=device, dtype=dtype)
    if backbone in ("sd3", "flux"):
        if not path:
            raise HypersdError(f"backbone {backbone!r} needs a model: pass a hub id, a local diffusers folder "
                               f"or a .safetensors checkpoint")
        if backbone == "sd3":
            from .sd3 import load_sd3 as load
        else:
            from .flux import load_flux as load
        return load(path, device=device, dtype=dtype, **options)
    raise HypersdError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
