"""FLUX.1 teachers: dev (guidance-distilled) and schnell.

The transformer denoises packed latents (2x2 patches as tokens, with image and text position ids);
the teacher's latents are the VAE's own, [16, H/8, W/8], and packing, unpacking and the ids happen
inside the network call exactly as ``FluxPipeline`` does them, so every sampler and loss works on
the same latents as for any other teacher. Prompts: CLIP-L's pooled output and T5's token states.

Guidance: FLUX.1-dev was distilled from CFG into a guidance embedding (its transformer config has
``guidance_embeds``). ``eps_cfg`` therefore runs ONE pass with ω as the embedding, not a
conditional/unconditional pair, and records ω in ``guidance``: the student (the same transformer
with a LoRA, called through ``eps``) then embeds the same value, and the LoRA's metadata can store
it. schnell has no guidance embedding and takes no guidance: one pass, ω unused.

The schedule: the dynamic shift of the training resolution's token count as a static shift
(``flux_shift``; schnell's config has a static shift of 1), the transformer called at σ (it scales
by 1000 itself), "trailing" spacing on T = ``FLUX_T`` = 1200: the k-step boundaries are FluxPipeline's
default sigmas linspace(1, 1/k, k), shifted, for every k dividing 1200 (8 and 16 among them).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from hypersd.core.noise import FLUX_T
from hypersd.errors import HypersdError
from hypersd.teachers.base import Cond
from hypersd.teachers.sd import place
from hypersd.teachers.sd3 import FlowTeacher, flow_shift, load_flow_parts, token_ids

FLUX_COMPONENTS = {
    "transformer": FluxTransformer2DModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "tokenizer": CLIPTokenizer,
    "text_encoder_2": T5EncoderModel,
    "tokenizer_2": T5TokenizerFast,
}
RESOLUTION = 1024  # FluxPipeline's default image side: its default_sample_size 128 times the VAE's 8
DEV_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (the embedding FLUX.1-dev is sampled with)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents to FLUX's [B, H/2·W/2, 4C] tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for an [H, W] latent (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the packed tokens of an [H, W] latent: (0, row, column) per token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxTeacher(FlowTeacher):
    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler_config: dict, resolution: int | tuple[int, int] = RESOLUTION, max_sequence_length: int | None = None,
                 guidance: float | None = None):
        cfg = transformer.config
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if cfg.in_channels % 4 or cfg.in_channels // 4 != vae.config.latent_channels:
            raise HypersdError(f"the transformer takes {cfg.in_channels} channels, not 4 x the VAE's "
                               f"{vae.config.latent_channels} (2x2 packed latents); these are not one FLUX model")
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        if height % (2 * scale) or width % (2 * scale) or min(height, width) <= 0:
            raise HypersdError(f"FLUX images must be a multiple of {2 * scale} pixels on a side (2x2 patches of "
                               f"the VAE's 1/{scale} latents); got {height}x{width}")
        h, w = height // scale, width // scale
        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        flow = dict(shift=flow_shift(scheduler_config, (h // 2) * (w // 2)), timestep_scale=1.0, spacing="trailing",
                    T=FLUX_T, num_train_timesteps=steps)
        super().__init__(transformer, vae, scheduler_config, (cfg.in_channels // 4, h, w), flow)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.guidance_embeds = bool(cfg.guidance_embeds)
        # dev's T5 context is 512 tokens; schnell was trained on 256 (FluxPipeline's docs)
        self.max_sequence_length = int(max_sequence_length or (512 if self.guidance_embeds else 256))
        if self.guidance_embeds:
            self.default_guidance = DEV_GUIDANCE
            self.guidance: float | None = float(DEV_GUIDANCE if guidance is None else guidance)
        else:
            if guidance is not None:
                raise HypersdError("this FLUX transformer has no guidance embedding (schnell): it takes no guidance")
            self.default_guidance = 1.0  # ω = 1: one conditional pass, as schnell is sampled
            self.guidance = None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """As ``FluxPipeline.encode_prompt``: T5's token states, and CLIP's pooled output."""
        clip = self.text_encoder(token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length, self.device))
        t5 = self.encode_t5(prompts)
        return Cond(t5.to(self.dtype), {"pooled_projections": clip.pooler_output.to(self.dtype)})

    @torch.no_grad()
    def encode_t5(self, prompts: list[str]) -> torch.Tensor:
        """T5's token states [B, max_sequence_length, D]: ``encode_prompt``'s whole sequence."""
        return self.text_encoder_2(token_ids(self.tokenizer_2, prompts, self.max_sequence_length, self.device))[0]

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity v = ε − x0 of whatever ``unet`` is now (named ``eps`` as the interface is), on
        unpacked latents; dev's guidance embedding is ``guidance``. Inputs in the network's dtype, the
        output in float32."""
        return self._call(x, t, cond, self.guidance)

    def eps_cfg(self, x, t, cond: Cond, uncond: Cond, w) -> torch.Tensor:
        """dev: one pass with ω as the guidance embedding (recorded in ``guidance``; ``uncond`` is
        not used: the CFG pair is what the embedding was distilled from). schnell: one pass, no
        guidance."""
        if not self.guidance_embeds:
            return self.eps(x, t, cond)
        w = torch.as_tensor(w, dtype=torch.float32)
        if w.dim() == 0:
            self.guidance = float(w)
        return self._call(x, t, cond, w)

    def _call(self, x, t, cond: Cond, guidance) -> torch.Tensor:
        out = self.unet(**self.network_inputs(x, t, cond, guidance))
        return unpack(out.sample, *x.shape[2:]).float()

    def network_inputs(self, x: torch.Tensor, t, cond: Cond, guidance=None) -> dict:
        """The transformer's keyword inputs on packed tokens; dev's guidance embedding is
        ``guidance``, or the recorded ``self.guidance`` when None."""
        n, _, h, w = x.shape
        cond = self.network_cond(cond)
        g = None
        if self.guidance_embeds:
            g = self.guidance if guidance is None else guidance
            g = torch.as_tensor(g, dtype=torch.float32, device=x.device).reshape(-1).expand(n)
        return {"hidden_states": pack(x.to(self.dtype)), "timestep": self.model_timestep(t, x), "guidance": g,
                "pooled_projections": cond.added["pooled_projections"], "encoder_hidden_states": cond.hidden,
                "txt_ids": torch.zeros(cond.hidden.shape[1], 3, device=x.device, dtype=self.dtype),
                "img_ids": image_ids(h, w, x.device, self.dtype)}


def load_flux(path: str, device="cpu", dtype=None, config: str | None = None,
              resolution: int | tuple[int, int] = RESOLUTION,
              max_sequence_length: int | None = None, guidance: float | None = None) -> FluxTeacher:
    """A FLUX.1 dev or schnell teacher from a hub id, a local diffusers folder or one .safetensors file.

    ``resolution``: the image side (or (height, width)) it is distilled at: its schedule's shift is
    that of the image's token count, as FluxPipeline's dynamic shift."""
    parts, sched = load_flow_parts("flux", path, FLUX_COMPONENTS, config)
    place(parts, device, dtype)
    return FluxTeacher(**parts, scheduler_config=sched, resolution=resolution,
                       max_sequence_length=max_sequence_length, guidance=guidance)
