"""``Generator``: a loaded model, its LoRA and its plan, making images eager or compiled."""

from __future__ import annotations

from ..device import resolve_device
from ..errors import HypersdError
from .choices import pick_dtype, pick_path
from .models import load_model
from .pipeline import attach_lora, build_pipeline, quiet
from .plan import resolve
from .recipes import Recipe, lora_recipe
from .schedulers import make_scheduler, scheduler_call_args


class Generator:
    """A loaded model, its LoRA and its plan: ``images(prompts, seeds)`` in [-1, 1]."""

    def __init__(self, model: str, lora: str | None = None, *, backbone: str | None = None, steps=None,
                 scheduler=None, eta=None, guidance=None, lora_scale: float = 1.0, negative_prompt=None,
                 device: str = "auto", dtype: str = "auto", config: str | None = None, compile: bool = False,
                 compile_backend="inductor"):
        device = resolve_device(device)
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
            from ..speed import CompiledInference, channels_last

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
        from ..sampling import initial_noise

        plan = self.plan
        # x_T drawn as hypersd's sampler draws it, in float32 whatever the dtype: torch 2.11 draws other
        # numbers in float16 on the CPU, and a seed must give one image on every device and dtype.
        # Each image's generator then drives its own re-noising (TCD), so a batch changes nothing.
        noise, generators = zip(*(initial_noise(1, self.teacher.latent_shape, s) for s in seeds))
        noise = torch.cat(noise).to(self.teacher.device, self.teacher.dtype)
        negative = [plan.negative_prompt] * len(prompts) if plan.negative_prompt else None
        # TCD warns on timesteps off its 40-point grid: a one-step LoRA at t = 800, a 12-step recipe
        with quiet("diffusers.schedulers.scheduling_tcd"):
            latents = self.pipe(prompt=list(prompts), negative_prompt=negative, guidance_scale=plan.guidance,
                                latents=noise, generator=list(generators), output_type="latent",
                                **scheduler_call_args(plan)).images
        used = [int(t) for t in self.pipe.scheduler.timesteps]
        if used != plan.timesteps:  # DDIM chose its own spacing; never sample on other timesteps silently
            raise HypersdError(f"the {plan.scheduler} scheduler ran timesteps {used}, not {plan.timesteps}")
        with torch.no_grad():
            return self.teacher.decode(latents).float().cpu()
