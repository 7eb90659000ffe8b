"""The real SD1.5, SDXL, SD3 / SD3.5 and FLUX.1 architectures as configs, built with random weights.

Compute does not depend on weight values, so these measure what distilling or sampling the real
models costs without downloading them (``benchmarks/``). The numbers are those of the released
models' config files (SD1.5: CLIP ViT-L/14 text encoder, 4-level UNet; SDXL: ViT-L/14 + OpenCLIP
ViT-bigG/14, 3-level UNet with 2 and 10 transformer layers, size/crop micro-conditioning; SD3-medium,
SD3.5-large and FLUX.1-dev: their transformers' configs, T5-XXL's encoder, the 16-channel VAE).
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


# The flow models' transformers, as their released transformer/config.json files give them.
TRANSFORMERS = {
    "sd3": ("SD3Transformer2DModel", dict(  # stable-diffusion-3-medium
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)),
    "sd35-large": ("SD3Transformer2DModel", dict(  # stable-diffusion-3.5-large
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "flux": ("FluxTransformer2DModel", dict(  # FLUX.1-dev
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}
# their text encoders: CLIP-L (and SD3's CLIP-G, both with projection) and T5-XXL's encoder, with
# the T5 length each pipeline encodes at; the CLIPs' 77 tokens come first in SD3's sequence
FLOW_TEXT = {"sd3": (("clip-l", "clip-bigg"), 256), "sd35-large": (("clip-l", "clip-bigg"), 256),
             "flux": (("clip-l",), 512)}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
FLOW_VAE = VAE | dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def transformer(name: str, device=None, dtype=torch.float32, **overrides):
    """A randomly initialised SD3 / SD3.5 / FLUX.1 transformer of ``name``'s released config."""
    import diffusers

    cls, config = TRANSFORMERS[name]
    with torch.device(device or "cpu"):
        model = getattr(diffusers, cls)(**(config | overrides))
    return _cast(model, dtype).requires_grad_(False)


def t5_encoder(device=None, dtype=torch.float32, **overrides):
    from transformers import T5Config, T5EncoderModel

    with torch.device(device or "cpu"):
        model = T5EncoderModel(T5Config(**(T5_XXL | overrides)))
    return model.to(dtype=dtype).requires_grad_(False).eval()


def flow_text_encoders(name: str, device=None, dtype=torch.float32) -> list:
    """The CLIP encoder(s) (with projection) and T5-XXL's encoder of a flow model."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clips, _ = FLOW_TEXT[name]
    cls = CLIPTextModel if name == "flux" else CLIPTextModelWithProjection
    out = []
    for kind in clips:
        with torch.device(device or "cpu"):
            model = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=TOKENS, **TEXT_ENCODERS[kind]))
        out.append(model.to(dtype=dtype).requires_grad_(False).eval())
    return [*out, t5_encoder(device, dtype)]


def flow_tokens(name: str, resolution: int = 1024) -> tuple[int, int]:
    """(image tokens, text tokens) of one sample at ``resolution`` pixels: 2x2 latent patches
    of the VAE's 1/8 latents, and the text sequence the transformer attends to beside them."""
    _, t5 = FLOW_TEXT[name]
    image = (resolution // 8 // 2) ** 2
    return image, t5 + (TOKENS if name != "flux" else 0)
