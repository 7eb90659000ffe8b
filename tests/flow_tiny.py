"""Tiny, randomly initialised SD3 and FLUX pipelines, built offline, for tests.

The real architectures (two CLIP encoders and T5 for SD3; CLIP and T5 for FLUX; a 16-channel KL VAE
with a shift and a scale; SD3's MMDiT; FLUX's double/single stream transformer with guidance
embeddings) at a size that runs in milliseconds on a CPU. T5's tokenizer is a Unigram over single
characters, built in memory. Deterministic: each component is built right after seeding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from sd_tiny import TEXT_DIM, _text_config, tiny_tokenizer
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

T5_LENGTH = 12  # the T5 sequence (max_sequence_length); real SD3 uses 256, FLUX.1-dev 512
T5_DIM = 80  # wider than the CLIP pair (2 x 32), so SD3's zero padding of the CLIP states shows
LATENT_SIZE = 8  # latent side; the VAE halves, so images are 16x16
# SD3's and FLUX.1's own VAE constants
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def t5_tokenizer() -> T5Tokenizer:
    """T5's Unigram tokenizer over single characters (``▁`` marks a word start), appending ``</s>``."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -3.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_LENGTH)


def t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def flow_vae(constants: dict) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=2 * LATENT_SIZE, use_quant_conv=False, use_post_quant_conv=False,
        **constants,
    )


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * 32, pos_embed_max_size=8,
    )
    vae = flow_vae(SD3_VAE)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = t5_encoder(tokenizer_3)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """``guidance_embeds`` True: FLUX.1-dev's guidance-distilled transformer; False: schnell's."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    vae = flow_vae(FLUX_VAE)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = t5_encoder(tokenizer_2)
    sched = FLUX_SCHEDULER if guidance_embeds else {**FLUX_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**sched), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def save_flow_tiny(kind: str, folder, seed: int = 0, **kwargs) -> Path:
    """Write a tiny ``kind`` ("sd3", "flux", "flux-schnell") pipeline to ``folder`` as a diffusers folder."""
    folder = Path(folder)
    if kind == "sd3":
        pipe = tiny_sd3_pipeline(seed, **kwargs)
    else:
        pipe = tiny_flux_pipeline(seed, guidance_embeds=kind == "flux", **kwargs)
    pipe.save_pretrained(folder)
    return folder
