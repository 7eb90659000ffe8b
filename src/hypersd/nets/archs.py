"""The real SD1.5 and SDXL architectures as configs, built with random weights.

Compute does not depend on weight values, so these measure what distilling or sampling the real
models costs without downloading them (``benchmarks/``). The numbers are those of the released
models' config files (SD1.5: CLIP ViT-L/14 text encoder, 4-level UNet; SDXL: ViT-L/14 + OpenCLIP
ViT-bigG/14, 3-level UNet with 2 and 10 transformer layers, size/crop micro-conditioning).
"""

from __future__ import annotations

import torch

UNETS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
VAE_SCALE = {"sd15": 0.18215, "sdxl": 0.13025}
TEXT_ENCODERS = {  # CLIPTextConfig fields; SDXL's second encoder is a CLIPTextModelWithProjection
    "clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu"),
    "clip-bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu"),
}
TOKENS = 77  # CLIP's context length
# The teachers' training schedule (both models): scaled-linear betas over 1,000 steps.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def unet(backbone: str, device=None, dtype=torch.float32, **overrides):
    """A randomly initialised UNet of ``backbone``'s architecture (built on ``device`` directly:
    initialising SDXL's 2.6 B weights on a CPU takes longer than the benchmark itself)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device or "cpu"):
        model = UNet2DConditionModel(**(UNETS[backbone] | overrides))
    return _cast(model, dtype).requires_grad_(False)


def vae(backbone: str, device=None, dtype=torch.float32, **overrides):
    from diffusers import AutoencoderKL

    size = UNETS[backbone]["sample_size"] * 8
    with torch.device(device or "cpu"):
        model = AutoencoderKL(**(VAE | {"sample_size": size, "scaling_factor": VAE_SCALE[backbone]} | overrides))
    return _cast(model, dtype).requires_grad_(False).eval()


def text_encoders(backbone: str, device=None, dtype=torch.float32) -> list:
    """The backbone's text encoders (their token ids are all a benchmark needs: no tokenizer)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kinds = [("clip-l", CLIPTextModel)] + ([("clip-bigg", CLIPTextModelWithProjection)] if backbone == "sdxl" else [])
    out = []
    for name, cls in kinds:
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=TOKENS, **TEXT_ENCODERS[name])
        with torch.device(device or "cpu"):
            model = cls(config)
        out.append(model.to(dtype=dtype).requires_grad_(False).eval())
    return out


def _cast(model, dtype):
    # nn.Module.to, not diffusers' override: that one warns on any dtype change
    return torch.nn.Module.to(model, dtype=dtype)


def alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE).alphas_cumprod.float()


def prompt_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the UNet's text inputs: what a latent cache stores for one caption."""
    dim = UNETS[backbone]["cross_attention_dim"]
    shapes = {"hidden": (TOKENS, dim)}
    if backbone == "sdxl":
        shapes |= {"text_embeds": (TEXT_ENCODERS["clip-bigg"]["projection_dim"],), "time_ids": (6,)}
    return shapes
