"""A diffusers pipeline over a loaded teacher's modules, with a LoRA fused in."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from hypersd.errors import HypersdError
from hypersd.inference.schedulers import make_scheduler


@contextlib.contextmanager
def quiet(logger: str):
    """Hold back a diffusers logger's warnings about choices made here on purpose."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)



def build_pipeline(teacher, backbone: str):
    """A diffusers pipeline over the teacher's own modules (nothing is copied or loaded again)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if backbone in ("sd3", "flux"):
        return _flow_pipeline(teacher, backbone)
    common = dict(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=teacher.unet,
                  scheduler=make_scheduler("ddim", teacher.scheduler_config))
    if backbone == "sdxl":
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=teacher.text_encoder_2,
                                         tokenizer_2=teacher.tokenizer_2, add_watermarker=False,
                                         force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flow_pipeline(teacher, backbone: str):
    """StableDiffusion3Pipeline or FluxPipeline; its scheduler is set per plan (``Generator``)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
    )

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler_config)
    common = dict(transformer=teacher.unet, scheduler=scheduler, vae=teacher.vae, text_encoder=teacher.text_encoder,
                  tokenizer=teacher.tokenizer, text_encoder_2=teacher.text_encoder_2, tokenizer_2=teacher.tokenizer_2)
    if backbone == "sd3":
        pipe = StableDiffusion3Pipeline(**common, text_encoder_3=teacher.text_encoder_3,
                                        tokenizer_3=teacher.tokenizer_3)
    else:
        pipe = FluxPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attach_lora(pipe, path: str | Path, hypersd_meta: dict | None, scale: float = 1.0,
                backbone: str | None = None) -> None:
    """Load a LoRA file into the pipeline and fuse it (one UNet pass per step, as without LoRA).

    hypersd's files, and every file for an SD3 or FLUX transformer, are read by ``lora.layouts``
    (diffusers assumes alpha = rank, and reads no kohya SD3 file); any other SD1.5/SDXL file (the
    published Hyper-SD15/SDXL ones, kohya's, diffusers') goes to diffusers' own converters."""
    from safetensors.torch import load_file

    if hypersd_meta is not None or backbone in ("sd3", "flux"):
        from hypersd.lora.layouts import read_any, to_diffusers

        state = to_diffusers(*read_any(path))
    else:
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise HypersdError(f"{path} is not a readable safetensors LoRA file ({e})") from None
    try:
        # UNet-only files make diffusers warn that the text encoder got no LoRA keys
        with quiet("diffusers.loaders.lora_base"), quiet("diffusers.loaders.lora_pipeline"):
            pipe.load_lora_weights(state, adapter_name="hypersd")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["hypersd"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HypersdError(f"LoRA {path} does not fit this model ({reason}); was it trained on another backbone?") from None
