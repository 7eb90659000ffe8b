"""A model's backbone, and loading it as a hypersd teacher from a hub id, a folder or one file."""

from __future__ import annotations

import json
from pathlib import Path

from hypersd.errors import HypersdError
from hypersd.hub import check_hub_id

FLOW_BACKBONES = ("sd3", "flux")  # transformer teachers (teachers.sd3, teachers.flux)


def detect_backbone(model: str) -> str:
    """sd15 or sdxl from the UNet's config (SDXL's has the text_time embedding), sd3 or flux from
    the transformer's class or, for a single checkpoint file, from its key names."""
    path = Path(str(model)).expanduser()
    if path.is_file():
        return _file_backbone(path)
    if path.is_dir():
        if (path / "transformer" / "config.json").is_file():
            return _transformer_backbone(json.loads((path / "transformer" / "config.json").read_text()), path)
        cfg_file = path / "unet" / "config.json"
        if not cfg_file.is_file():
            raise HypersdError(f"{path} has no unet/config.json nor transformer/config.json; pass a diffusers folder "
                               f"(as save_pretrained writes it), a hub id, or a single .safetensors checkpoint")
        cfg = json.loads(cfg_file.read_text())
    else:
        check_hub_id(model, "model", "pass a diffusers folder, a .safetensors checkpoint or a hub id (owner/name)")
        from diffusers import UNet2DConditionModel

        try:
            cfg = UNet2DConditionModel.load_config(str(model), subfolder="unet")
        except (OSError, ValueError) as e:
            try:  # no UNet: a transformer model (SD3, FLUX)
                return _transformer_backbone(UNet2DConditionModel.load_config(str(model), subfolder="transformer"),
                                             model)
            except (OSError, ValueError):
                pass
            raise HypersdError(f"cannot read {model}'s UNet or transformer config ({type(e).__name__}): pass a local "
                               f"diffusers folder, a .safetensors checkpoint, or a hub id that is cached or "
                               f"downloadable; or name the backbone with --backbone") from None
    return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd15"


def _transformer_backbone(cfg: dict, source) -> str:
    from hypersd.teachers.sd3 import TRANSFORMERS

    for backbone, cls in TRANSFORMERS.items():
        if cfg.get("_class_name") == cls:
            return backbone
    raise HypersdError(f"{source}'s transformer is a {cfg.get('_class_name')}; hypersd generates with "
                       f"{' or '.join(TRANSFORMERS.values())} (SD3, FLUX.1) transformers and SD1.5/SDXL UNets")


def _file_backbone(path: Path) -> str:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise HypersdError(f"{path} is not a .safetensors checkpoint; hypersd loads single files in safetensors "
                           f"only (convert a .ckpt once with a trusted tool)")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise HypersdError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if any(k.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb.")) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15"
    # diffusers' own markers of the original SD3 and FLUX checkpoints (with or without the prefix)
    if any(k.split("model.diffusion_model.")[-1].startswith("joint_blocks.") for k in keys):
        return "sd3"
    if any(k.split("model.diffusion_model.")[-1].startswith("double_blocks.") for k in keys):
        return "flux"
    raise HypersdError(f"cannot tell whether {path} is SD1.5, SDXL, SD3 or FLUX from its keys; pass --backbone")


def load_model(model: str, backbone: str | None = None, device="cpu", dtype=None, config: str | None = None,
               size: tuple[int, int] | None = None):
    """A hypersd teacher (``teachers.sd``, ``teachers.sd3``, ``teachers.flux``) from a hub id, a
    diffusers folder or one .safetensors file. ``size``: (height, width) of the images to make, which
    sets a FLUX teacher's shift (that of its token count, as FluxPipeline's); default its 1024²."""
    from hypersd.teachers.sd import load_sd

    detected = detect_backbone(model)
    if backbone and backbone != detected:
        raise HypersdError(f"{model} is an {detected} model, not {backbone}; drop --backbone or pass {detected}")
    if detected in FLOW_BACKBONES:  # their loaders take a folder, a hub id or one file alike
        from hypersd.teachers import load_teacher

        options = {"resolution": tuple(size)} if detected == "flux" and size else {}
        return load_teacher(detected, str(model), device=device, dtype=dtype, config=config, **options), detected
    if Path(str(model)).expanduser().is_file():
        return _single_file(Path(str(model)).expanduser(), detected, device, dtype, config), detected
    return load_sd(detected, str(model), device=device, dtype=dtype), detected


def _single_file(path: Path, backbone: str, device, dtype, config: str | None):
    """diffusers' from_single_file; ``config``: a diffusers folder or hub id with the model's
    component configs (needed offline, where diffusers cannot fetch them)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from hypersd.teachers.sd import SD15Teacher, SDXLTeacher, place

    cls = StableDiffusionXLPipeline if backbone == "sdxl" else StableDiffusionPipeline
    kw = {"safety_checker": None, "requires_safety_checker": False} if backbone == "sd15" else {}
    try:
        pipe = cls.from_single_file(str(path), config=config, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HypersdError(f"cannot load {path} as a single {backbone} checkpoint ({reason}); offline, pass "
                           f"--model-config a diffusers {backbone} folder or cached hub id") from None
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
    if backbone == "sdxl":
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    place(parts, device, dtype)
    if backbone == "sd15":
        return SD15Teacher(**parts, scheduler_config=dict(pipe.scheduler.config))
    return SDXLTeacher(**parts, scheduler_config=dict(pipe.scheduler.config),
                       force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True))
