"""``Generator``: a loaded model, its LoRA and its plan, making images eager or compiled."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypersd.device import resolve_device
from hypersd.errors import HypersdError
from hypersd.inference.choices import pick_dtype, pick_path
from hypersd.inference.models import load_model
from hypersd.inference.pipeline import attach_lora, build_pipeline, quiet
from hypersd.inference.plan import resolve
from hypersd.inference.recipes import Recipe, lora_recipe
from hypersd.inference.schedulers import (
    flow_call_args,
    make_flow_scheduler,
    make_scheduler,
    scheduler_call_args,
)

if TYPE_CHECKING:  # annotations only: torch is imported where it runs
    import torch


class Generator:
    """A loaded model, its LoRA and its plan: ``images(prompts, seeds)`` in [-1, 1]."""

    def __init__(self, model: str, lora: str | None = None, *, backbone: str | None = None, steps=None,
                 scheduler=None, eta=None, guidance=None, lora_scale: float | None = None, negative_prompt=None,
                 device: str = "auto", dtype: str = "auto", config: str | None = None, compile: bool = False,
                 compile_backend="inductor", width: int | None = None, height: int | None = None):
        device = resolve_device(device)
        dtype = pick_dtype(dtype, device)
        recipe, meta = lora_recipe(lora) if lora else (Recipe(), None)
        import torch

        size = None if width is None and height is None else (height or width, width or height)
        if size is None and meta and meta.get("resolution"):  # a FLUX LoRA: the size (and shift) it was trained at
            size = tuple(meta["resolution"])
            height, width = size
        self.teacher, backbone = load_model(model, backbone, device, getattr(torch, dtype), config, size)
        # a FLUX LoRA without "T" counted its timesteps on T = 1000, before FLUX_T
        counted_on = (meta or {}).get("T", 1000 if (meta or {}).get("backbone") == "flux" else self.teacher.T)
        if meta and meta.get("one_step_t") is not None and counted_on != self.teacher.T:
            raise HypersdError(f"{lora} counts its one-step timestep {meta['one_step_t']} on T={counted_on}, this "
                               f"model's timesteps on T={self.teacher.T} (FLUX's since 16-step support); train the "
                               f"LoRA again with this hypersd")
        if meta and meta.get("max_sequence_length") and hasattr(self.teacher, "max_sequence_length"):
            self.teacher.max_sequence_length = int(meta["max_sequence_length"])  # the T5 length it was trained at
        self.plan = resolve(recipe, model=model, backbone=backbone, lora=lora, T=self.teacher.T,
                            default_guidance=self.teacher.default_guidance, steps=steps, scheduler=scheduler,
                            eta=eta, guidance=guidance, lora_scale=lora_scale, negative_prompt=negative_prompt,
                            dtype=dtype, spacing=self.teacher.schedule.spacing,
                            flow=self.teacher.schedule if self.teacher.prediction_type == "flow" else None)
        self.latent_shape = self._latent_shape(width, height)
        self.plan.height, self.plan.width = (v * self.teacher.vae_scale_factor for v in self.latent_shape[1:])
        self.pipe = build_pipeline(self.teacher, backbone)
        if lora:
            attach_lora(self.pipe, lora, meta, self.plan.lora_scale, backbone)
        # a flow teacher's pipeline runs Euler (or hypersd's TCD step, eta > 0) on its sigmas;
        # SD1.5/SDXL's DDIM or TCD on its timesteps
        self.flow = self.teacher.schedule if self.teacher.prediction_type == "flow" else None
        if self.flow is not None:
            self.plan.scheduler = "tcd" if self.plan.eta > 0 else "euler"  # TCD at eta 0 and DDIM are Euler on a flow
            self.pipe.scheduler = make_flow_scheduler(self.teacher.scheduler_config, self.flow.shift, self.plan.eta,
                                                      self.flow, self.plan.timesteps)
            compile = False  # CompiledInference swaps a UNet; a transformer pipeline stays eager
        else:
            self.pipe.scheduler = make_scheduler(self.plan.scheduler, self.teacher.scheduler_config)
        # the path images are made on: "eager", or "compiled" where the first batch of a size showed
        # that it gives eager's images faster (compiled code is specialised to the batch size)
        self._compiled, self._paths = None, {}
        if compile:
            from hypersd.nets.speed import CompiledInference, channels_last

            on_gpu = str(device).startswith("cuda")
            if on_gpu:
                channels_last(self.pipe.unet)
                channels_last(self.teacher.vae)
            mode = "reduce-overhead" if on_gpu and compile_backend == "inductor" else None
            self._compiled = CompiledInference(self.pipe, self.teacher.vae, compile_backend, mode)
        self.path = "eager" if self._compiled is None else "undecided"

    def _latent_shape(self, width: int | None, height: int | None) -> tuple[int, int, int]:
        """(C, H, W) of the latents for an image of ``width`` x ``height`` (default: the model's own)."""
        c, h, w = self.teacher.latent_shape
        f = self.teacher.vae_scale_factor
        multiple = 2 * f  # a transformer's 2x2 patches; SD's UNet halves the latent at least once
        size = [h * f if height is None else height, w * f if width is None else width]
        for name, v in zip(("--height", "--width"), size):
            if v < multiple or v % multiple:
                raise HypersdError(f"{name} {v} is not a positive multiple of {multiple} pixels, as this model's "
                                   f"latents need; pass e.g. {max(multiple, round(v / multiple) * multiple)}")
        return c, size[0] // f, size[1] // f

    @property
    def path_note(self) -> str:
        """What each batch size runs on, and what was measured to choose it."""
        if self._compiled is None:
            return "eager (not compiled)" if self.flow is None else "eager (transformer models are not compiled)"
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
        from hypersd.core.sampling import initial_noise

        plan = self.plan
        # x_T drawn as hypersd's sampler draws it, in float32 whatever the dtype: torch 2.11 draws other
        # numbers in float16 on the CPU, and a seed must give one image on every device and dtype.
        # Each image's generator then drives its own re-noising (TCD), so a batch changes nothing.
        noise, generators = zip(*(initial_noise(1, self.latent_shape, s) for s in seeds))
        noise = torch.cat(noise).to(self.teacher.device, self.teacher.dtype)
        negative = [plan.negative_prompt] * len(prompts) if plan.negative_prompt else None
        if self.flow is not None:
            latents = self._flow_latents(list(prompts), noise, negative, list(generators))
        else:
            # TCD warns on timesteps off its 40-point grid: a one-step LoRA at t = 800, a 12-step recipe
            with quiet("diffusers.schedulers.scheduling_tcd"):
                latents = self.pipe(prompt=list(prompts), negative_prompt=negative, guidance_scale=plan.guidance,
                                    latents=noise, generator=list(generators), output_type="latent",
                                    height=plan.height, width=plan.width, **scheduler_call_args(plan)).images
            used = [int(t) for t in self.pipe.scheduler.timesteps]
            if used != plan.timesteps:  # DDIM chose its own spacing; never sample on other timesteps silently
                raise HypersdError(f"the {plan.scheduler} scheduler ran timesteps {used}, not {plan.timesteps}")
        with torch.no_grad():
            return self.teacher.decode(latents).float().cpu()

    def _flow_latents(self, prompts, noise, negative, generators) -> "torch.Tensor":
        """SD3's or FLUX's pipeline on the teacher's boundaries; FLUX's latents go in and come out
        packed (2x2 patches as tokens), and are the teacher's unpacked ones here."""
        import torch

        from hypersd.core.noise import shift_sigma
        from hypersd.teachers.flux import pack, unpack

        plan, flux = self.plan, self.plan.backbone == "flux"
        if plan.eta > 0:  # each image's re-noising from its own generator, drawn as hypersd's sampler draws it
            def draw(x):
                z = torch.cat([torch.randn((1, *self.latent_shape), generator=g) for g in generators]).to(x.device)
                return pack(z) if flux else z

            self.pipe.scheduler.draw = draw
        sigmas = flow_call_args(plan, self.flow)["sigmas"]
        kwargs = dict(prompt=prompts, guidance_scale=plan.guidance, latents=pack(noise) if flux else noise,
                      generator=generators, output_type="latent", height=plan.height, width=plan.width,
                      max_sequence_length=self.teacher.max_sequence_length, sigmas=sigmas)
        if not flux:  # FLUX's negative prompt is "true CFG", which a guidance-distilled model does not use
            kwargs["negative_prompt"] = negative
        latents = self.pipe(**kwargs).images
        # the shift of the unshifted u the pipeline was given (for a boundary t, exactly flow.sigma(t))
        want = shift_sigma(torch.tensor(sigmas, dtype=torch.float64), self.flow.shift).float()
        ran = self.pipe.scheduler.sigmas[:-1].cpu()
        if ran.shape != want.shape or (ran - want).abs().max() > 1e-6:  # never sample on other sigmas silently
            raise HypersdError(f"the flow scheduler ran sigmas {ran.tolist()}, not the teacher's {want.tolist()}")
        return unpack(latents, *self.latent_shape[1:]) if flux else latents
