"""Tiny, randomly initialised SD1.5 / SDXL pipelines, built offline, for tests.

Same architectures as the real ones (CLIP encoders, UNet with cross attention, SDXL's text_time
embedding, a KL VAE) at a size that runs in milliseconds on a CPU. Deterministic: each component
is built right after seeding.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

MAX_LENGTH = 16  # tokens per prompt; real CLIP has 77
LATENT_SIZE = 8  # latent side; the VAE below halves, so images are 16x16
TEXT_DIM = 32
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", prediction_type="epsilon")


def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table (GPT-2's): the alphabet a byte-level BPE vocab is written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every character is a token (with its end-of-word form)."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=2 * LATENT_SIZE,
    )


def _unet(**kwargs) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), **kwargs,
    )


def tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """``prediction_type`` "v_prediction": the same UNet read as an SD2-style v-model."""
    torch.manual_seed(seed)
    unet = _unet(layers_per_block=1, cross_attention_dim=TEXT_DIM)
    vae = _vae()
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = DDIMScheduler(**{**SD_SCHEDULE, "prediction_type": prediction_type}, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    time_dim = 8
    unet = _unet(
        layers_per_block=2, cross_attention_dim=2 * TEXT_DIM, transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        # six time ids, each embedded to time_dim, plus text_encoder_2's pooled projection
        projection_class_embeddings_input_dim=6 * time_dim + 32,
    )
    vae = _vae()
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    scheduler = EulerDiscreteScheduler(**{**SD_SCHEDULE, "prediction_type": prediction_type}, steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler,
    )


def tiny_pipeline(kind: str, seed: int = 0, prediction_type: str = "epsilon"):
    return {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}[kind](seed, prediction_type)


def save_tiny(kind: str, folder, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny ``kind`` ("sd15" or "sdxl") pipeline to ``folder`` as a diffusers folder."""
    folder = Path(folder)
    tiny_pipeline(kind, seed, prediction_type).save_pretrained(folder)
    return folder


def tiny_teacher(kind: str, folder, seed: int = 0, prediction_type: str = "epsilon"):
    """A hypersd teacher loaded, as a user's would be, from a tiny pipeline saved to ``folder``."""
    from hypersd.teachers import load_teacher

    return load_teacher(kind, str(save_tiny(kind, folder, seed, prediction_type)))
