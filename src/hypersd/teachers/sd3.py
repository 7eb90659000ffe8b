"""Rectified-flow transformer teachers, and SD3 / SD3.5 among them.

``FlowTeacher`` is what SD3 and FLUX.1 (``teachers.flux``) share: the network is a diffusers
transformer that predicts v = ε − x0 on a ``FlowSchedule``, a 16-channel VAE with a shift and a
scale, and loading from a hub id, a local diffusers folder or one .safetensors checkpoint (diffusers'
``from_single_file``). Components are loaded one by one, as ``teachers.sd`` loads SD1.5 and SDXL, so
a folder with a missing or broken part fails naming it.

SD3 (``SD3Teacher``): the MMDiT transformer, CLIP-L and CLIP-G (both with projection) and T5;
prompts are encoded exactly as ``StableDiffusion3Pipeline.encode_prompt`` does; guidance is real CFG
(a conditional and an unconditional row per sample). Its schedule: the scheduler's shift, the
network called at 1000·σ, "inclusive" spacing on T = 841 (docs/METHOD.md, "Flow boundaries on the
σ grid"): the k-step boundaries are the sigmas of the stock scheduler's ``set_timesteps(k)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

from hypersd.core.noise import FlowSchedule, flux_shift
from hypersd.errors import HypersdError
from hypersd.teachers.base import Cond, FlowScheduled, Teacher
from hypersd.teachers.sd import LatentCodec, _load, model_source, place

SD3_COMPONENTS = {
    "transformer": SD3Transformer2DModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModelWithProjection,
    "tokenizer": CLIPTokenizer,
    "text_encoder_2": CLIPTextModelWithProjection,
    "tokenizer_2": CLIPTokenizer,
    "text_encoder_3": T5EncoderModel,
    "tokenizer_3": T5TokenizerFast,
}
# the transformer class of each flow backbone, and which backbone each class belongs to
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
# FlowMatchEulerDiscreteScheduler options that move its sigmas off FlowSchedule's (shift(u) of a
# linear u): a teacher configured so would be sampled on other boundaries than it is trained on
UNMODELLED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
              "invert_sigmas", "stochastic_sampling")


def flow_shift(scheduler_config: dict, image_seq_len: int) -> float:
    """The static shift of a flow scheduler config at ``image_seq_len`` transformer tokens: its
    ``shift``, or under dynamic shifting the shift its ``mu`` gives there (``flux_shift``)."""
    bad = [k for k in UNMODELLED if scheduler_config.get(k)]
    if bad:
        raise HypersdError(f"the model's scheduler config sets {', '.join(bad)}, which hypersd's flow schedule does "
                           f"not model; use a model whose FlowMatchEulerDiscreteScheduler has them off")
    if not scheduler_config.get("use_dynamic_shifting"):
        return float(scheduler_config.get("shift", 1.0))
    if scheduler_config.get("time_shift_type", "exponential") != "exponential":
        raise HypersdError(f"the model's scheduler shifts its sigmas by {scheduler_config['time_shift_type']!r}; "
                           f"hypersd's flow schedule models the exponential dynamic shift only")
    return flux_shift(image_seq_len, base_seq_len=scheduler_config.get("base_image_seq_len", 256),
                      max_seq_len=scheduler_config.get("max_image_seq_len", 4096),
                      base_shift=scheduler_config.get("base_shift", 0.5),
                      max_shift=scheduler_config.get("max_shift", 1.15))


def load_flow_parts(backbone: str, path: str, components: dict, config: str | None = None):
    """(modules by component name, scheduler config) of a flow model: a hub id, a diffusers folder
    or one .safetensors checkpoint (``single_file``). The transformer's class is checked before any
    weight is read, so a model of the other family is refused with the backbone to use."""
    file = Path(str(path)).expanduser()
    if file.is_file():
        return single_file(backbone, file, components, config)
    check_pipeline(backbone, path)  # first: a Redux folder has no transformer to check
    path = model_source(path, ["transformer"], backbone)
    transformer_config = _load(SD3Transformer2DModel.load_config, path, "transformer")
    check_transformer(backbone, transformer_config, path)
    path = model_source(path, [*components, "scheduler"], backbone)
    check_channels(backbone, path, transformer_config.get("in_channels"), _load(AutoencoderKL.load_config, path, "vae"))
    parts = {name: _load(cls.from_pretrained, path, name) for name, cls in components.items()}
    return parts, dict(_load(FlowMatchEulerDiscreteScheduler.load_config, path, "scheduler"))


def check_transformer(backbone: str, config: dict, source) -> None:
    actual = config.get("_class_name")
    if actual == TRANSFORMERS[backbone]:
        return
    other = next((b for b, cls in TRANSFORMERS.items() if cls == actual), None)
    fix = f"use backbone {other}" if other else f"pass a {backbone} model"
    raise HypersdError(f"{source}'s transformer is a {actual or 'model of unknown class'}, not the "
                       f"{TRANSFORMERS[backbone]} of a {backbone} model; {fix}")


# pipelines whose transformer takes more than the noisy latents and the prompt: no text-to-image models
NOT_TEXT_TO_IMAGE = {
    "FluxFillPipeline": "FLUX.1 Fill, an inpainting model (its transformer takes the masked image and the mask too)",
    "FluxControlPipeline": "a FLUX.1 Depth or Canny model (its transformer takes a control image's latents too)",
    "FluxKontextPipeline": "FLUX.1 Kontext, an image-editing model (it takes a reference image's tokens beside the noise)",
    "FluxKontextInpaintPipeline": "FLUX.1 Kontext, an image-editing model (it takes a reference image's tokens beside the noise)",
    "FluxPriorReduxPipeline": "FLUX.1 Redux, an image-variation adapter, not a model",
}
# how many latents' channels a transformer's input holds: FLUX packs 2x2 patches into channels
PACKED = {"sd3": 1, "flux": 4}


def _fix(backbone: str) -> str:
    models = "FLUX.1-dev, FLUX.1-schnell" if backbone == "flux" else "SD3 / SD3.5"
    return f"hypersd distils text-to-image models: pass {models} or a text-to-image fine-tune of it"


def check_pipeline(backbone: str, source) -> None:
    """Refuse, before anything loads, a model whose folder names a pipeline that is no text-to-image one."""
    from diffusers import DiffusionPipeline

    try:
        pipeline = DiffusionPipeline.load_config(str(source)).get("_class_name")
    except Exception:  # no model_index.json (or none cached): the channel check still holds
        return
    if pipeline in NOT_TEXT_TO_IMAGE:
        raise HypersdError(f"{source} is {NOT_TEXT_TO_IMAGE[pipeline]} ({pipeline}); {_fix(backbone)}")


def check_channels(backbone: str, source, in_channels: int | None, vae_config: dict) -> None:
    """Refuse, before any weight is read, a transformer that takes more than the noisy latents (FLUX
    Fill, Depth, Canny: an image's latents beside them), by its input width against its VAE's."""
    latents = vae_config.get("latent_channels")
    if in_channels is not None and latents is not None and in_channels != PACKED[backbone] * latents:
        what = {"flux": " (FLUX.1 Fill takes 384, Depth and Canny 128: an image's latents beside the noise)"}
        raise HypersdError(f"{source}'s transformer takes {in_channels} input channels, not the "
                           f"{PACKED[backbone] * latents} of its VAE's {latents}-channel latents"
                           f"{what.get(backbone, '')}; {_fix(backbone)}")


# the patch embedding's weight in a single file, by layout: [hidden, in_channels(, p, p)]
_EMBEDDING = ("img_in.weight", "x_embedder.weight", "x_embedder.proj.weight", "pos_embed.proj.weight")


def _file_in_channels(keys, shape_of) -> int | None:
    for key in keys:
        if key.removeprefix("model.diffusion_model.") in _EMBEDDING:
            return int(shape_of(key)[1])
    return None


def single_file(backbone: str, file: Path, components: dict, config: str | None):
    """The transformer (and the VAE, where the file holds one) from one checkpoint, by diffusers'
    ``from_single_file`` (the original layout converted, diffusers' own taken as it is); the text
    encoders, tokenizers and scheduler from ``config``, a diffusers folder or hub id of the model:
    published SD3.5 and FLUX files hold the transformer alone."""
    from safetensors import safe_open

    if file.suffix != ".safetensors":
        raise HypersdError(f"{file} is not a .safetensors checkpoint; hypersd loads single files in safetensors "
                           f"only (convert a .ckpt once with a trusted tool)")
    if config is None:
        raise HypersdError(f"{file} is one checkpoint; name a diffusers {backbone} folder (or cached hub id) as its "
                           f"config for the text encoders, tokenizers and scheduler: {CONFIG_FIX}")
    source, transformer_config = _config_source(config, backbone)
    check_transformer(backbone, transformer_config, source)
    try:
        with safe_open(str(file), "pt") as f:
            has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in f.keys())
            in_channels = _file_in_channels(f.keys(), lambda k: f.get_slice(k).get_shape())  # header only
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise HypersdError(f"{file} is not a readable safetensors checkpoint ({e})") from None
    from_file = ["transformer", "vae"] if has_vae else ["transformer"]
    rest = [name for name in components if name not in from_file]
    source = model_source(source, [*rest, "scheduler"], backbone)
    check_pipeline(backbone, source)
    check_channels(backbone, file, in_channels or transformer_config.get("in_channels"),
                   _load(AutoencoderKL.load_config, source, "vae"))
    parts = {name: _load(components[name].from_pretrained, source, name) for name in rest}
    for name in from_file:
        try:
            parts[name] = components[name].from_single_file(str(file), config=source, subfolder=name)
        except Exception as e:  # diffusers' converters raise many kinds on a checkpoint of another model
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise HypersdError(f"cannot load the {name} of {file} as a {backbone} checkpoint ({reason}); pass a "
                               f"{backbone} checkpoint, and its diffusers folder as its config: {CONFIG_FIX}") from None
    return parts, dict(_load(FlowMatchEulerDiscreteScheduler.load_config, source, "scheduler"))


CONFIG_FIX = "--model-config DIR (generate, cache), or teacher_config: DIR in the recipe (--set teacher_config=DIR)"


def _config_source(config: str, backbone: str) -> tuple[str, dict]:
    """A single file's config as ``from_pretrained`` takes it, and its transformer's config; one
    that is neither a complete local folder nor readable from the hub cache is refused naming the
    fix (offline, nothing is fetched)."""
    source = model_source(config, ["transformer"], backbone)
    try:
        transformer_config = SD3Transformer2DModel.load_config(source, subfolder="transformer")
    except (OSError, ValueError) as e:
        if Path(source).is_dir():
            raise HypersdError(f"config folder {source} has no readable transformer/config.json ({type(e).__name__}); "
                               f"pass a complete diffusers {backbone} folder: {CONFIG_FIX}") from None
        raise HypersdError(f"config {source} is not a local folder and is neither in the hub cache nor downloadable "
                           f"(offline?); download the {backbone} model's diffusers folder once and name it: "
                           f"{CONFIG_FIX}") from None
    return source, transformer_config


def token_ids(tokenizer, prompts: list[str], length: int, device) -> torch.Tensor:
    """Prompts padded and truncated to ``length`` tokens, as every flow pipeline tokenizes them."""
    out = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out.input_ids.to(device)


class FlowTeacher(FlowScheduled, LatentCodec, Teacher):
    """A transformer predicting v = ε − x0 on ``schedule`` (a ``FlowSchedule``), with a VAE codec.

    The transformer is held as ``unet`` (also ``transformer``): every stage and the LoRA code
    address the denoiser by that name, and the student is the same module with adapters on."""

    def __init__(self, transformer, vae, scheduler_config: dict, latent_shape, flow: dict):
        self.unet, self.vae = transformer, vae
        self.scheduler_config = dict(scheduler_config)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.flow_config = dict(flow)  # FlowSchedule's arguments
        self._schedule = FlowSchedule(**self.flow_config)  # the network calls' own, with its device tables

    @property
    def transformer(self) -> torch.nn.Module:
        return self.unet

    def model_timestep(self, t, x: torch.Tensor) -> torch.Tensor:
        """What the transformer is called with at t, one per row of x, float32."""
        return self._schedule.model_timestep(torch.as_tensor(t, device=x.device)).expand(x.shape[0])


class SD3Teacher(FlowTeacher):
    default_guidance = 7.0  # StableDiffusion3Pipeline's default guidance_scale

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
                 tokenizer_3, scheduler_config: dict, max_sequence_length: int = 256):
        cfg = transformer.config
        size = cfg.sample_size
        tokens = (size // cfg.patch_size) ** 2
        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        flow = dict(shift=flow_shift(scheduler_config, tokens), timestep_scale=float(steps), spacing="inclusive",
                    T=841, num_train_timesteps=steps)
        super().__init__(transformer, vae, scheduler_config, (cfg.in_channels, size, size), flow)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.max_sequence_length = int(max_sequence_length)  # T5 tokens; the pipeline's default is 256

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """As ``StableDiffusion3Pipeline.encode_prompt``: both CLIP encoders' penultimate states side
        by side (each padded to the first tokenizer's length), zero-padded to T5's width and followed
        by T5's tokens; the pooled vector is both CLIP projections side by side."""
        length = self.tokenizer.model_max_length
        hidden, pooled = [], []
        for encoder, tokenizer in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
            out = encoder(token_ids(tokenizer, prompts, length, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = self.encode_t5(prompts)
        clip = torch.cat(hidden, dim=-1)
        if clip.shape[-1] > t5.shape[-1]:
            raise HypersdError(f"the CLIP states ({clip.shape[-1]} wide) are wider than T5's ({t5.shape[-1]}); "
                               f"these text encoders are not an SD3 set")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Cond(torch.cat([clip, t5], dim=-2).to(self.dtype),
                    {"pooled_projections": torch.cat(pooled, dim=-1).to(self.dtype)})

    @property
    def clip_width(self) -> int:
        """The CLIP states' width in ``encode_prompt``'s sequence; the columns after it, up to T5's, are zeros."""
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @torch.no_grad()
    def encode_t5(self, prompts: list[str]) -> torch.Tensor:
        """T5's token states [B, max_sequence_length, D]: the end of ``encode_prompt``'s sequence."""
        return self.text_encoder_3(token_ids(self.tokenizer_3, prompts, self.max_sequence_length, self.device))[0]

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity v = ε − x0 of whatever ``unet`` is now (named ``eps`` as the interface is),
        the transformer called at 1000·σ_t; inputs in its dtype, the output in float32."""
        return self.unet(**self.network_inputs(x, t, cond)).sample.float()

    def network_inputs(self, x: torch.Tensor, t, cond: Cond) -> dict:
        cond = self.network_cond(cond)
        return {"hidden_states": x.to(self.dtype), "timestep": self.model_timestep(t, x),
                "encoder_hidden_states": cond.hidden, "pooled_projections": cond.added["pooled_projections"]}


def load_sd3(path: str, device="cpu", dtype=None, config: str | None = None,
             max_sequence_length: int = 256) -> SD3Teacher:
    """An SD3 / SD3.5 teacher from a hub id, a local diffusers folder or one .safetensors file
    (``config``: the model's diffusers folder or hub id, for the parts the file lacks)."""
    parts, sched = load_flow_parts("sd3", path, SD3_COMPONENTS, config)
    place(parts, device, dtype)
    return SD3Teacher(**parts, scheduler_config=sched, max_sequence_length=max_sequence_length)
