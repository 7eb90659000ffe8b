"""``hypersd generate``: images from a model and a LoRA through diffusers' pipelines.

The pipeline's scheduler runs on hypersd's segment boundaries (``schedule.inference_timesteps``),
so a hypersd LoRA gives here the images ``sampling.sample_tcd`` gives in training and evaluation.
Both schedulers end at x0, as hypersd's sampler does: diffusers' own DDIM and TCD, with SD's
config, stop at ᾱ_0 = 0.99915 instead (docs/METHOD.md, "Sampling").

Which steps, scheduler, eta and guidance a LoRA is sampled with comes, in this order, from the
command line, from the LoRA (a published Hyper-SD file by its name, a hypersd file by its
metadata), or from the model's defaults. docs/GENERATE.md has the published recipes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import HypersdError

# torch is imported where it is used: building the command line imports none of it
SCHEDULERS = ("tcd", "ddim")
DTYPES = ("float32", "float16", "bfloat16")
BASE_STEPS = 25  # a model without a LoRA: the paper's baseline step count
COMPILE = ("auto", "on", "off")
COMPILE_MIN_IMAGES = 32  # "auto" compiles from this many images on: compiling takes about a minute
SAME_IMAGE = 4 / 127.5  # the compiled path's images may differ from eager's by 4 levels of 8 bits at most

_HUB_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")
# Hyper-SD's released LoRA files: Hyper-SD15-1step-lora, Hyper-SDXL-8steps-CFG-lora, ...
_PUBLISHED = re.compile(r"hyper-sd(15|xl)-(\d+)steps?(-cfg)?-lora", re.IGNORECASE)


# -- what to sample with ------------------------------------------------------------------------
@dataclass
class Recipe:
    """Sampling defaults a LoRA brings; None leaves the choice to the next source."""

    steps: int | None = None
    scheduler: str | None = None
    eta: float | None = None
    guidance: float | None = None
    backbone: str | None = None
    one_step_t: int | None = None
    # a hypersd LoRA's measured eta per step count ("4": 0.3), preferred over ``eta`` at those counts
    etas: dict | None = None
    source: str = "model defaults"
    # trained on hypersd's segment boundaries: a step count without boundaries is refused
    on_boundaries: bool = False


def published_recipe(path: str | Path) -> Recipe | None:
    """The recipe Hyper-SD's authors published for one of their LoRA files, known by its name.

    N-step LoRAs: DDIM trailing, no CFG. The 1-step LoRA is the unified one: TCD with eta 1 at any
    of 1 to 8 steps. The CFG LoRAs keep classifier-free guidance: 5 (they publish 5 to 8)."""
    m = _PUBLISHED.search(Path(path).name)
    if not m:
        return None
    backbone = "sd15" if m.group(1) == "15" else "sdxl"
    steps, cfg = int(m.group(2)), bool(m.group(3))
    source = f"published Hyper-SD recipe for {m.group(0)}"
    if cfg:
        return Recipe(steps, "ddim", 0.0, 5.0, backbone, source=source)
    if steps == 1:
        return Recipe(1, "tcd", 1.0, 0.0, backbone, source=source)
    return Recipe(steps, "ddim", 0.0, 0.0, backbone, source=source)


def hypersd_recipe(meta: dict, path) -> Recipe:
    """A hypersd LoRA's own metadata: its guidance, its one-step timestep, TCD form."""
    return Recipe(scheduler="tcd", eta=0.0, guidance=meta.get("guidance"), backbone=meta.get("backbone"),
                  one_step_t=meta.get("one_step_t"), etas=meta.get("recommended_eta"),
                  source=f"hypersd LoRA metadata of {Path(path).name}", on_boundaries=True)


@dataclass
class Plan:
    """Everything one generation run is sampled with; written into each PNG."""

    model: str
    backbone: str
    lora: str | None
    steps: int
    scheduler: str
    eta: float
    guidance: float
    timesteps: list[int]
    one_step_t: int | None = None
    lora_scale: float = 1.0
    negative_prompt: str | None = None
    recipe: str = "model defaults"
    dtype: str = "float32"


def resolve(recipe: Recipe, *, model: str, backbone: str, lora: str | None, T: int, default_guidance: float,
            steps=None, scheduler=None, eta=None, guidance=None, lora_scale: float = 1.0,
            negative_prompt: str | None = None, dtype: str = "float32") -> Plan:
    """The command line's choices over the LoRA's recipe over the model's defaults."""
    if recipe.backbone and recipe.backbone != backbone:
        raise HypersdError(f"{Path(lora).name} is an {recipe.backbone} LoRA but {model} is an {backbone} model; "
                           f"pass a {recipe.backbone} model or a LoRA trained on this one")
    if steps is None:
        steps = recipe.steps if recipe.steps is not None else (BASE_STEPS if lora is None else None)
    if steps is None:
        raise HypersdError(f"no step count is known for LoRA {lora} (neither a published Hyper-SD file name nor "
                           f"hypersd metadata); pass --steps N")
    if steps < 1:
        raise HypersdError(f"--steps must be at least 1, got {steps}")
    scheduler = scheduler or recipe.scheduler or "ddim"
    if scheduler not in SCHEDULERS:
        raise HypersdError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if eta is None:
        eta = recipe.eta if (recipe.eta is not None and scheduler == "tcd") else 0.0
        if scheduler == "tcd" and str(steps) in (recipe.etas or {}):
            eta = float(recipe.etas[str(steps)])
    if not 0.0 <= eta <= 1.0:
        raise HypersdError(f"--eta is TCD's gamma, between 0 and 1; got {eta}")
    if eta > 0 and scheduler != "tcd":
        raise HypersdError(f"--eta {eta} needs --scheduler tcd (DDIM is TCD at eta 0)")
    if guidance is None:
        guidance = recipe.guidance if recipe.guidance is not None else (default_guidance if lora is None else 1.0)
    one_step_t = recipe.one_step_t if steps == 1 else None
    if one_step_t is not None and scheduler == "ddim":
        raise HypersdError(f"this LoRA's one step starts at t={one_step_t}, which diffusers' DDIM cannot start at; "
                           f"use --scheduler tcd (with --eta 0 it is the same sampler)")
    timesteps = sampler_timesteps(steps, T, one_step_t, exact=recipe.on_boundaries)
    return Plan(model=str(model), backbone=backbone, lora=None if lora is None else str(lora), steps=steps,
                scheduler=scheduler, eta=float(eta), guidance=float(guidance), timesteps=timesteps,
                one_step_t=one_step_t, lora_scale=lora_scale, negative_prompt=negative_prompt, recipe=recipe.source,
                dtype=dtype)


def sampler_timesteps(k: int, T: int, one_step_t: int | None = None, exact: bool = True) -> list[int]:
    """hypersd's k-step timesteps (the segment boundaries, which exist where k divides T). Where
    they do not exist and ``exact`` is off (a published 12-step LoRA, a model alone), diffusers'
    DDIM trailing spacing, which the published recipes ran and which equals hypersd's wherever
    both exist; with ``exact`` on, the refusal of ``inference_timesteps``."""
    from .schedule import inference_timesteps

    if exact or T % k == 0 or one_step_t is not None:
        return inference_timesteps(k, T, one_step_t)
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ddim.set_timesteps(k)
    return [int(t) for t in ddim.timesteps]


# -- the schedulers ---------------------------------------------------------------------------
def make_scheduler(kind: str, config: dict):
    """diffusers' TCD or DDIM (trailing) from the model's scheduler config, ending at x0."""
    from diffusers import DDIMScheduler

    if kind == "ddim":
        # set_alpha_to_one: the last step lands on ᾱ = 1, i.e. returns x0
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         clip_sample=False, thresholding=False)
    if kind == "tcd":
        return _tcd_class().from_config(config, original_inference_steps=40)
    raise HypersdError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")


def scheduler_call_args(plan: Plan) -> dict:
    """The pipeline arguments that put its scheduler on ``plan.timesteps``.

    TCD takes them as they are; DDIM takes only a count, and its trailing spacing gives the same
    list (checked after the run)."""
    if plan.scheduler == "tcd":
        return {"timesteps": list(plan.timesteps), "eta": plan.eta}
    return {"num_inference_steps": plan.steps, "eta": 0.0}


_TCD = None


def _tcd_class():
    """diffusers' TCDScheduler whose last step returns x0 (hypersd's sampler) instead of the
    ᾱ_0-noised x0; every other step is diffusers' own."""
    global _TCD
    if _TCD is None:
        from diffusers import TCDScheduler
        from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

        from .core.noise import DDPMSchedule

        class HypersdTCDScheduler(TCDScheduler):
            def step(self, model_output, timestep, sample, eta: float = 0.3, generator=None, return_dict: bool = True):
                if self.step_index is None:
                    self._init_step_index(timestep)
                last = self.step_index == len(self.timesteps) - 1
                out = super().step(model_output, timestep, sample, eta=eta, generator=generator, return_dict=True)
                if last:  # x0 by the model's parameterisation (ε or v), as hypersd's sampler reads it
                    schedule = DDPMSchedule(self.alphas_cumprod, self.config.prediction_type)
                    x0 = schedule.to_x0_eps(sample, model_output, int(timestep))[0].to(sample.dtype)
                    out = TCDSchedulerOutput(prev_sample=x0, pred_noised_sample=x0)
                return out if return_dict else (out.prev_sample, out.pred_noised_sample)

        _TCD = HypersdTCDScheduler
    return _TCD


@contextlib.contextmanager
def _quiet(logger: str):
    """Hold back a diffusers logger's warnings about choices made here on purpose."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# -- the model ----------------------------------------------------------------------------------
def detect_backbone(model: str) -> str:
    """sd15 or sdxl, from the UNet's config (SDXL's has the text_time embedding) or, for a single
    checkpoint file, from its key names."""
    path = Path(str(model)).expanduser()
    if path.is_file():
        return _file_backbone(path)
    if path.is_dir():
        cfg_file = path / "unet" / "config.json"
        if not cfg_file.is_file():
            raise HypersdError(f"{path} has no unet/config.json; pass a diffusers folder (as save_pretrained "
                               f"writes it), a hub id, or a single .safetensors checkpoint")
        cfg = json.loads(cfg_file.read_text())
    elif not _HUB_ID.fullmatch(str(model)):
        raise HypersdError(f"model {model} not found; pass a diffusers folder, a .safetensors checkpoint or a hub id "
                           f"(owner/name)")
    else:
        from diffusers import UNet2DConditionModel

        try:
            cfg = UNet2DConditionModel.load_config(str(model), subfolder="unet")
        except (OSError, ValueError) as e:
            raise HypersdError(f"cannot read {model}'s UNet config ({type(e).__name__}): pass a local diffusers "
                               f"folder, a .safetensors checkpoint, or a hub id that is cached or downloadable; "
                               f"or name the backbone with --backbone") from None
    return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd15"


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
    raise HypersdError(f"cannot tell whether {path} is SD1.5 or SDXL from its keys; pass --backbone sd15 or sdxl")


def load_model(model: str, backbone: str | None = None, device="cpu", dtype=None, config: str | None = None):
    """A hypersd teacher (``teachers.sd``) from a hub id, a diffusers folder or one .safetensors file."""
    from .teachers.sd import load_sd

    detected = detect_backbone(model)
    if backbone and backbone != detected:
        raise HypersdError(f"{model} is an {detected} model, not {backbone}; drop --backbone or pass {detected}")
    if Path(str(model)).expanduser().is_file():
        return _single_file(Path(str(model)).expanduser(), detected, device, dtype, config), detected
    return load_sd(detected, str(model), device=device, dtype=dtype), detected


def _single_file(path: Path, backbone: str, device, dtype, config: str | None):
    """diffusers' from_single_file; ``config``: a diffusers folder or hub id with the model's
    component configs (needed offline, where diffusers cannot fetch them)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .teachers.sd import SD15Teacher, SDXLTeacher, place

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


def build_pipeline(teacher, backbone: str):
    """A diffusers pipeline over the teacher's own modules (nothing is copied or loaded again)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

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


# -- the LoRA -------------------------------------------------------------------------------------
def lora_recipe(path: str | Path) -> tuple[Recipe, dict | None]:
    """(recipe, hypersd metadata or None) of a LoRA file, read without loading its weights."""
    from .outputs import read_metadata

    path = Path(path)
    if not path.is_file():
        raise HypersdError(f"LoRA file {path} not found")
    if path.suffix != ".safetensors":
        raise HypersdError(f"{path} is not a .safetensors file; hypersd loads LoRAs in safetensors only")
    meta = read_metadata(path, "LoRA")
    if meta:
        return hypersd_recipe(meta, path), meta
    return published_recipe(path) or Recipe(source=f"no recipe known for {path.name}"), None


def attach_lora(pipe, path: str | Path, hypersd_meta: dict | None, scale: float = 1.0) -> None:
    """Load a LoRA file into the pipeline and fuse it (one UNet pass per step, as without LoRA).

    hypersd's files are converted by ``lora_files`` (diffusers assumes alpha = rank); any other
    file (the published Hyper-SD ones, kohya's, diffusers') goes to diffusers' own converters."""
    from safetensors.torch import load_file

    if hypersd_meta is not None:
        from .lora_files import read_any, to_diffusers

        state = to_diffusers(*read_any(path))
    else:
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise HypersdError(f"{path} is not a readable safetensors LoRA file ({e})") from None
    try:
        # UNet-only files make diffusers warn that the text encoder got no LoRA keys
        with _quiet("diffusers.loaders.lora_base"), _quiet("diffusers.loaders.lora_pipeline"):
            pipe.load_lora_weights(state, adapter_name="hypersd")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["hypersd"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HypersdError(f"LoRA {path} does not fit this model ({reason}); was it trained on another backbone?") from None


# -- running ----------------------------------------------------------------------------------------
class Generator:
    """A loaded model, its LoRA and its plan: ``images(prompts, seeds)`` in [-1, 1]."""

    def __init__(self, model: str, lora: str | None = None, *, backbone: str | None = None, steps=None,
                 scheduler=None, eta=None, guidance=None, lora_scale: float = 1.0, negative_prompt=None,
                 device: str = "auto", dtype: str = "auto", config: str | None = None, compile: bool = False,
                 compile_backend="inductor"):
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        recipe, meta = lora_recipe(lora) if lora else (Recipe(), None)
        import torch

        self.teacher, backbone = load_model(model, backbone, device, getattr(torch, dtype), config)
        self.plan = resolve(recipe, model=model, backbone=backbone, lora=lora, T=self.teacher.T,
                            default_guidance=self.teacher.default_guidance, steps=steps, scheduler=scheduler,
                            eta=eta, guidance=guidance, lora_scale=lora_scale, negative_prompt=negative_prompt,
                            dtype=dtype)
        self.pipe = build_pipeline(self.teacher, backbone)
        if lora:
            attach_lora(self.pipe, lora, meta, lora_scale)
        self.pipe.scheduler = make_scheduler(self.plan.scheduler, self.teacher.scheduler_config)
        # the path images are made on: "eager", or "compiled" where the first batch of a size showed
        # that it gives eager's images faster (compiled code is specialised to the batch size)
        self._compiled, self._paths = None, {}
        if compile:
            from .speed import CompiledInference, channels_last

            on_gpu = str(device).startswith("cuda")
            if on_gpu:
                channels_last(self.pipe.unet)
                channels_last(self.teacher.vae)
            mode = "reduce-overhead" if on_gpu and compile_backend == "inductor" else None
            self._compiled = CompiledInference(self.pipe, self.teacher.vae, compile_backend, mode)
        self.path = "eager" if self._compiled is None else "undecided"

    @property
    def path_note(self) -> str:
        """What each batch size runs on, and what was measured to choose it."""
        if self._compiled is None:
            return "eager (not compiled)"
        if len(self._paths) == 1:
            return next(iter(self._paths.values()))[1]
        return "; ".join(f"batch {n}: {note}" for n, (_, note) in sorted(self._paths.items())) or "undecided"

    def images(self, prompts: list[str], seeds: list[int]) -> "torch.Tensor":
        """Images [B, 3, H, W] in [-1, 1], float32 on the CPU; image i from ``seeds[i]`` alone,
        whatever else is in its batch."""
        if self._compiled is None:
            return self._images(prompts, seeds)
        if len(prompts) not in self._paths:
            return self._decide_path(prompts, seeds)
        self.path = self._paths[len(prompts)][0]
        self._compiled.use(self.path == "compiled")
        return self._images(prompts, seeds)

    def _decide_path(self, prompts: list[str], seeds: list[int]) -> "torch.Tensor":
        """The first batch of a size runs eager twice (the second is timed and returned), then
        compiled twice (the first compiles); the compiled path is kept for that size if both of its
        images are eager's and it is faster. A compiler that fails leaves the eager path, with the
        reason in ``path_note``."""
        import time

        def timed():
            t0 = time.perf_counter()
            out = self._images(prompts, seeds)  # ends on the CPU: the device has finished
            return out, time.perf_counter() - t0

        self._compiled.use(False)
        self._images(prompts, seeds)
        reference, eager_s = timed()
        self._compiled.use(True)
        try:
            first, _ = timed()
            again, compiled_s = timed()
        except Exception as e:  # dynamo and inductor raise many kinds; any of them means: stay eager
            decision = ("eager", f"eager: compiling failed ({type(e).__name__}: {str(e).strip()[:160]})")
        else:
            diff = max((first - reference).abs().max().item(), (again - reference).abs().max().item())
            decision = pick_path(diff, eager_s, compiled_s)
        self._paths[len(prompts)] = decision
        self.path = decision[0]
        self._compiled.use(self.path == "compiled")
        return reference

    def _images(self, prompts: list[str], seeds: list[int]) -> "torch.Tensor":
        import torch

        if len(prompts) != len(seeds):
            raise HypersdError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        from .sampling import initial_noise

        plan = self.plan
        # x_T drawn as hypersd's sampler draws it, in float32 whatever the dtype: torch 2.11 draws other
        # numbers in float16 on the CPU, and a seed must give one image on every device and dtype.
        # Each image's generator then drives its own re-noising (TCD), so a batch changes nothing.
        noise, generators = zip(*(initial_noise(1, self.teacher.latent_shape, s) for s in seeds))
        noise = torch.cat(noise).to(self.teacher.device, self.teacher.dtype)
        negative = [plan.negative_prompt] * len(prompts) if plan.negative_prompt else None
        # TCD warns on timesteps off its 40-point grid: a one-step LoRA at t = 800, a 12-step recipe
        with _quiet("diffusers.schedulers.scheduling_tcd"):
            latents = self.pipe(prompt=list(prompts), negative_prompt=negative, guidance_scale=plan.guidance,
                                latents=noise, generator=list(generators), output_type="latent",
                                **scheduler_call_args(plan)).images
        used = [int(t) for t in self.pipe.scheduler.timesteps]
        if used != plan.timesteps:  # DDIM chose its own spacing; never sample on other timesteps silently
            raise HypersdError(f"the {plan.scheduler} scheduler ran timesteps {used}, not {plan.timesteps}")
        with torch.no_grad():
            return self.teacher.decode(latents).float().cpu()


def pick_path(max_diff: float, eager_s: float, compiled_s: float) -> tuple[str, str]:
    """(path, why): "compiled" only if its images are eager's (within ``SAME_IMAGE``) and it is faster."""
    measured = f"eager {1000 * eager_s:.1f} ms, compiled {1000 * compiled_s:.1f} ms a batch, max |diff| {max_diff:.2g}"
    if not max_diff <= SAME_IMAGE:  # NaN included
        return "eager", f"eager: the compiled path gave other images ({measured})"
    if compiled_s >= eager_s:
        return "eager", f"eager: compiling did not make it faster ({measured})"
    return "compiled", f"compiled ({measured})"


def pick_compile(flag: str, device: str, n_images: int) -> bool:
    """--compile on / off, or auto: on a GPU and from ``COMPILE_MIN_IMAGES`` images on, where it pays."""
    if flag not in COMPILE:
        raise HypersdError(f"unknown --compile {flag!r}; choose one of {', '.join(COMPILE)}")
    if flag == "auto":
        return str(device).startswith("cuda") and n_images >= COMPILE_MIN_IMAGES
    return flag == "on"


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HypersdError(f"--device {device} asked for, but torch sees no CUDA device; pass --device cpu")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if str(device).startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise HypersdError(f"unknown --dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return dtype


# -- prompts and files ------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise HypersdError(f"prompt file {path} not found; pass a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise HypersdError(f"prompt file {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise HypersdError(f"prompt file {path} holds no prompt; write one prompt per line")
    return prompts


@dataclass
class Job:
    """One image to make: its file, prompt and seed."""

    path: Path
    prompt: str
    seed: int


def plan_jobs(prompts: list[str], out_dir: str | Path, per_prompt: int = 1, seed: int = 0,
              force: bool = False) -> list[Job]:
    """Image j (prompt j // per_prompt) is ``out_dir/{j:05d}.png`` from seed ``seed + j``.

    Every file is checked before anything is generated: an existing one without ``force`` stops
    the run before it spends any time."""
    from .outputs import check_writable

    if per_prompt < 1:
        raise HypersdError(f"--per-prompt must be at least 1, got {per_prompt}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HypersdError(f"--out {out_dir} is a file; pass a folder for the images")
    jobs = [Job(out_dir / f"{j:05d}.png", p, seed + j)
            for j, p in enumerate(p for p in prompts for _ in range(per_prompt))]
    for job in jobs:
        check_writable(job.path, force)
    return jobs


def save_png(image: "torch.Tensor", path: str | Path, prompt: str, settings: dict) -> Path:
    """One image in [-1, 1] as a PNG with its prompt and settings in the PNG's text chunks
    (``prompt``; ``hypersd``: JSON of the plan and the seed); written atomically."""
    import numpy as np
    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .outputs import atomic_path

    pixels = image.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    info = PngInfo()
    info.add_itxt("prompt", prompt)
    info.add_itxt("hypersd", json.dumps(settings))
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def run_jobs(gen: Generator, jobs: list[Job], batch_size: int = 4, progress: bool = True) -> list[Path]:
    """Generate and write every job, ``batch_size`` images per pipeline call."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise HypersdError(f"--batch-size must be at least 1, got {batch_size}")
    settings = asdict(gen.plan)
    written = []
    for i in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        batch = jobs[i:i + batch_size]
        images = gen.images([j.prompt for j in batch], [j.seed for j in batch])
        for job, image in zip(batch, images):
            written.append(save_png(image, job.path, job.prompt, {**settings, "seed": job.seed}))
    return written


# -- the command --------------------------------------------------------------------------------------
def add_sampling_args(p, shared: tuple[str, ...] = ()) -> None:
    """The model, LoRA and sampler options ``generate`` and ``eval --model`` share; ``shared``:
    the flags among them that the parser already has."""
    p.add_argument("--lora", default=None, help="a LoRA .safetensors: hypersd's, a published Hyper-SD file, "
                                                "kohya's or diffusers' (default: the model alone)")
    p.add_argument("--backbone", choices=("sd15", "sdxl"), default=None,
                   help="the model's backbone (default: read from its UNet config)")
    p.add_argument("--model-config", default=None,
                   help="for a single-file --model: a diffusers folder or hub id with its component configs")
    if "--steps" not in shared:
        p.add_argument("--steps", type=int, default=None,
                       help="sampling steps (default: the LoRA's recipe; 25 without a LoRA)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="tcd or ddim (trailing); default: the LoRA's recipe, else ddim")
    p.add_argument("--eta", type=float, default=None, help="TCD's gamma, 0 to 1 (0: DDIM)")
    if "--guidance" not in shared:
        p.add_argument("--guidance", type=float, default=None,
                       help="CFG scale; 0 or 1: none (default: the LoRA's recipe; the model's own without a LoRA)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplies the LoRA's effect")
    p.add_argument("--negative-prompt", default=None, help="the unconditional prompt when guidance > 1")
    p.add_argument("--seed", type=int, default=0, help="image j uses seed + j")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="default: float16 on a GPU, float32 on a CPU")
    p.add_argument("--compile", default="auto", choices=COMPILE,
                   help=f"compile the UNet and the VAE decoder (with CUDA graphs on a GPU); kept only if the first "
                        f"batch gives eager's images faster. auto: on a GPU from {COMPILE_MIN_IMAGES} images on")


def generator_from_args(a, steps: int | None, n_images: int = 1) -> Generator:
    return Generator(a.model, a.lora, backbone=a.backbone, steps=steps,
                     scheduler=a.scheduler, eta=a.eta, guidance=a.guidance, lora_scale=a.lora_scale,
                     negative_prompt=a.negative_prompt, device=a.device, dtype=a.dtype, config=a.model_config,
                     compile=pick_compile(a.compile, pick_device(a.device), n_images))


def prompts_from_args(a) -> list[str]:
    if bool(a.prompt) == bool(a.prompts):
        raise HypersdError("pass --prompt TEXT (repeatable) or --prompts FILE (one prompt per line), not both")
    return list(a.prompt) if a.prompt else read_prompts(a.prompts)


def cmd_generate(a) -> None:
    prompts = prompts_from_args(a)
    jobs = plan_jobs(prompts, a.out, a.per_prompt, a.seed, a.force)
    gen = generator_from_args(a, a.steps, len(jobs))
    p = gen.plan
    print(f"{p.backbone} {p.model}" + (f" + {p.lora}" if p.lora else "") +
          f": {p.steps} steps {p.scheduler} (timesteps {p.timesteps}), eta {p.eta:g}, guidance {p.guidance:g} "
          f"[{p.recipe}]")
    written = run_jobs(gen, jobs, a.batch_size, progress=not a.quiet)
    print(f"wrote {len(written)} images to {a.out}; path: {gen.path_note}")


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="images from SD1.5/SDXL and a LoRA (hypersd's or a published Hyper-SD file)",
                       description="Generates PNGs through diffusers' pipelines, on hypersd's segment boundaries; "
                                   "each PNG holds its prompt and settings in its metadata. A published Hyper-SD "
                                   "LoRA gets its published recipe (docs/GENERATE.md).")
    g.add_argument("--model", required=True, help="a hub id, a local diffusers folder or a single .safetensors file")
    add_sampling_args(g)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    g.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    g.add_argument("--out", required=True, help="output folder (images 00000.png, 00001.png, ...)")
    g.add_argument("--force", action="store_true", help="overwrite existing images")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=cmd_generate)
