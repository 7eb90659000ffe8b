"""Stable Diffusion teachers: SD1.5 and SDXL, from a hub id or a local diffusers folder.

Both are loaded component by component (not as a pipeline) so that a folder with a missing or
broken part fails with a message that names it, and so nothing we do not use (safety checker,
feature extractor) is ever loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hypersd.core.noise import DDPMSchedule
from hypersd.errors import HypersdError
from hypersd.hub import check_hub_id
from hypersd.teachers.base import Cond, Teacher

COMPONENTS = {
    "sd15": {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
    },
    "sdxl": {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer_2": CLIPTokenizer,
    },
}


def load_sd(backbone: str, path: str, device="cpu", dtype=None) -> Teacher:
    """Load an SD1.5 or SDXL teacher; ``path`` is a hub id or a local diffusers folder."""
    if backbone not in COMPONENTS:
        choices = ", ".join(COMPONENTS)
        raise HypersdError(f"unknown Stable Diffusion backbone {backbone!r}; choose one of {choices}")
    path = model_source(path, [*COMPONENTS[backbone], "scheduler"], backbone)
    parts = {name: _load(cls.from_pretrained, path, name) for name, cls in COMPONENTS[backbone].items()}
    sched = _load(DDPMScheduler.load_config, path, "scheduler")
    if (parts["unet"].config.addition_embed_type == "text_time") != (backbone == "sdxl"):
        actual = "sdxl" if backbone == "sd15" else "sd15"
        raise HypersdError(f"{path} is not an {backbone} model (its UNet is {actual}'s); use backbone {actual}")
    place(parts, device, dtype)
    if backbone == "sd15":
        return SD15Teacher(**parts, scheduler_config=sched)
    try:
        zeros = DiffusionPipeline.load_config(path).get("force_zeros_for_empty_prompt", True)
    except (OSError, ValueError):  # no model_index.json: keep the SDXL pipeline's default
        zeros = True
    return SDXLTeacher(**parts, scheduler_config=sched, force_zeros_for_empty_prompt=zeros)


def model_source(path, components, backbone: str) -> str:
    """``path`` as ``from_pretrained`` takes it: a local diffusers folder holding every one of
    ``components`` (each a subfolder), or a hub id."""
    path = str(path)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return check_hub_id(path, "model folder", "pass a diffusers folder or a hub id (owner/name)")
    for name in components:
        if not (folder / name).is_dir():
            raise HypersdError(
                f"{folder} has no {name!r} component (no {name}/ subfolder); pass a complete diffusers "
                f"{backbone} folder, as written by the pipeline's save_pretrained"
            )
    return str(folder)


def replace_vae(teacher: "_StableDiffusion", source: str) -> None:
    """Use another VAE than the model's own, e.g. an fp16-safe SDXL VAE that can run in half
    precision. ``source``: a folder holding an AutoencoderKL (its config.json and safetensors
    weights), a diffusers model folder (its vae/ is used), or a hub id."""
    folder = Path(str(source)).expanduser()
    if not folder.is_dir():
        check_hub_id(source, "VAE", "pass a folder with an AutoencoderKL (config.json and "
                                    "diffusion_pytorch_model.safetensors) or a hub id")
    sub = "vae" if (folder / "vae").is_dir() else None
    path = str(folder) if folder.exists() else str(source)
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder=sub, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HypersdError(f"cannot load a VAE from {source}: {reason}") from e
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.config.latent_channels != teacher.latent_shape[0] or factor != teacher.vae_scale_factor:
        raise HypersdError(f"VAE {source} makes {vae.config.latent_channels}-channel latents at 1/{factor} of the "
                           f"image size; this model needs {teacher.latent_shape[0]} channels at "
                           f"1/{teacher.vae_scale_factor}: pass a VAE made for it")
    dtype = teacher.dtype
    upcast = dtype == torch.float16 and vae.config.get("force_upcast", False)
    torch.nn.Module.to(vae.requires_grad_(False).eval(), device=teacher.device,
                       dtype=torch.float32 if upcast else dtype)
    teacher.vae = vae


def place(parts: dict, device, dtype) -> None:
    """A pipeline's modules frozen, in eval mode, on ``device`` in ``dtype``."""
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            # fp16 overflows in some VAEs (SDXL's); diffusers keeps those in float32, and so do we.
            upcast = name == "vae" and dtype == torch.float16 and part.config.get("force_upcast", False)
            # nn.Module.to, not diffusers' override: that one warns on any dtype, even with no fp32 modules
            torch.nn.Module.to(part.requires_grad_(False).eval(), device=device,
                               dtype=torch.float32 if upcast else dtype)


def _load(load, path: str, name: str):
    """``load(path, subfolder=name)``, its failures turned into one line that says what to do."""
    try:
        return load(path, subfolder=name)
    except (OSError, ValueError, RuntimeError) as e:
        if Path(path).is_dir():
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise HypersdError(f"cannot load {name!r} from {Path(path) / name}: {reason}") from e
        raise HypersdError(
            f"{path!r} is not a local folder, and its {name!r} is neither in the hub cache nor downloadable "
            f"({type(e).__name__}); download it once with network access, or pass a local diffusers folder"
        ) from e


class LatentCodec:
    """A teacher's VAE codec and its resolution; needs ``vae``, ``vae_scale_factor``, ``latent_shape``."""

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) of the images the network was trained on."""
        return self.latent_shape[1] * self.vae_scale_factor, self.latent_shape[2] * self.vae_scale_factor

    # The data pipeline never needs gradients through the encoder; decode keeps them (reward losses).
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return (z.float() - self._shift) * self.vae.config.scaling_factor  # float32, as every latent here

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + self._shift
        return self.vae.decode(z).sample.clamp(-1, 1).to(latents.dtype)

    @property
    def _shift(self) -> float:
        return self.vae.config.get("shift_factor") or 0.0


class _StableDiffusion(LatentCodec, Teacher):
    """What SD1.5 and SDXL share: the schedule, the latent shape and (``LatentCodec``) the VAE codec."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config):
        self.unet, self.vae = unet, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        # ε or v (SD2's 768 models): refused here, with the choices, if it is neither
        self.alphas_cumprod = DDPMSchedule.from_scheduler_config(self.scheduler_config).alphas_cumprod
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        self.latent_shape = (unet.config.in_channels, h, w)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def _tokens(self, tokenizer, prompts: list[str]) -> dict:
        out = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in out.items()}


class SD15Teacher(_StableDiffusion):
    default_guidance = 7.5

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Cond:
        tokens = self._tokens(self.tokenizer, prompts)
        # as StableDiffusionPipeline: the mask only for encoders trained with one
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens["attention_mask"] if use_mask else None
        return Cond(self.text_encoder(tokens["input_ids"], attention_mask=mask)[0].to(self.dtype))


class SDXLTeacher(_StableDiffusion):
    default_guidance = 5.0

    def __init__(self, unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler_config,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler_config)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    def time_ids(self, n: int, size=None, crop=None, target=None) -> torch.Tensor:
        """SDXL's micro-conditioning, [n, 6]: original (h, w), crop (top, left), target (h, w).

        ``size`` is the image's size before cropping and resizing, ``crop`` the crop's top-left
        corner, ``target`` the (h, w) it was cut to (an aspect-ratio bucket); each is one (a, b)
        pair for all rows or one pair per row. Defaults: the model's own resolution and no crop,
        as the diffusers pipeline uses. Float32 in any precision:
        sizes run to thousands, which bf16 rounds (1366 to 1368).
        """
        target = torch.as_tensor(self.resolution if target is None else target, dtype=torch.float32)
        size = torch.as_tensor(self.resolution if size is None else size, dtype=torch.float32)
        crop = torch.as_tensor((0, 0) if crop is None else crop, dtype=torch.float32)
        rows = [v.reshape(-1, 2).expand(n, 2) for v in (size, crop, target)]
        return torch.cat(rows, dim=1).to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size=None, crop=None, target=None) -> Cond:
        # as StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate layers,
        # concatenated, and the second encoder's projected pooled output
        one = self.text_encoder(self._tokens(self.tokenizer, prompts)["input_ids"], output_hidden_states=True)
        two = self.text_encoder_2(self._tokens(self.tokenizer_2, prompts)["input_ids"], output_hidden_states=True)
        hidden = [one.hidden_states[-2], two.hidden_states[-2]]
        pooled = two.text_embeds
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids(len(prompts), size, crop, target)}
        return Cond(torch.cat(hidden, dim=-1).to(self.dtype), added)

    def empty_cond(self, n: int, size=None, crop=None) -> Cond:
        if not self.force_zeros_for_empty_prompt:
            return self.encode_prompt([""] * n, size, crop)
        # the SDXL pipeline's unconditional input: zeros, not the encoding of ""
        length = self.tokenizer.model_max_length
        dim = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        zeros = torch.zeros(n, length, dim, device=self.device, dtype=self.dtype)
        pooled = torch.zeros(n, self.text_encoder_2.config.projection_dim, device=self.device, dtype=self.dtype)
        return Cond(zeros, {"text_embeds": pooled, "time_ids": self.time_ids(n, size, crop)})
