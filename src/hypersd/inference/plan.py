"""A run's plan: the command line's choices over the LoRA's recipe over the model's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypersd.errors import HypersdError
from hypersd.inference.recipes import Recipe
from hypersd.inference.schedulers import SCHEDULERS

BASE_STEPS = 25  # a model without a LoRA: the paper's baseline step count


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
    lora_scale_from: str = "default"  # where lora_scale came from: --lora-scale, the recipe, or the default 1
    negative_prompt: str | None = None
    recipe: str = "model defaults"
    dtype: str = "float32"
    width: int | None = None  # the image size; None: the model's own
    height: int | None = None
    # a flow pipeline's unshifted sigmas (u) where they are the stock scheduler's, not the teacher's
    # boundaries (a published Hyper-SD3 / Hyper-FLUX recipe); None: ``timesteps``' own
    sigmas: list[float] | None = None
    cfg: str | None = None  # the LoRA's: "preserve" for a CFG LoRA (recipes.Recipe.cfg)

    @property
    def passes(self) -> int:
        """Network passes a step: two (conditional and unconditional, the negative prompt's) with
        real CFG, one without it or with FLUX's embedded guidance."""
        return 2 if self.guidance > 1 and self.backbone != "flux" else 1


def resolve(recipe: Recipe, *, model: str, backbone: str, lora: str | None, T: int, default_guidance: float,
            steps=None, scheduler=None, eta=None, guidance=None, lora_scale: float | None = None,
            negative_prompt: str | None = None, dtype: str = "float32", spacing: str = "trailing",
            flow=None) -> Plan:
    """The command line's choices over the LoRA's recipe over the model's defaults. ``flow``: a
    flow teacher's ``FlowSchedule``, whose stock pipeline sigmas a published flow recipe samples on."""
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
    sigmas = None
    if recipe.stock_sigmas and flow is not None:
        from hypersd.inference.schedulers import stock_flow_sigmas

        if eta > 0:  # TCD's re-noising runs on hypersd's boundaries, which these sigmas are not
            raise HypersdError(f"{recipe.source} samples with the stock pipeline's Euler on its own sigmas; "
                               f"--eta {eta:g} needs hypersd's boundaries: pass --eta 0")

        sigmas = stock_flow_sigmas(backbone, steps, flow)
        timesteps = [int((flow.u[1:] - u).abs().argmin()) for u in sigmas]  # the nearest grid point, as a record
    else:
        timesteps = sampler_timesteps(steps, T, one_step_t, exact=recipe.on_boundaries, spacing=spacing)
    scale, scale_from = lora_scale, "--lora-scale"
    if scale is None:
        scale, scale_from = ((recipe.lora_scale, recipe.source) if recipe.lora_scale is not None else
                             (1.0, "default"))
    return Plan(model=str(model), backbone=backbone, lora=None if lora is None else str(lora), steps=steps,
                scheduler=scheduler, eta=float(eta), guidance=float(guidance), timesteps=timesteps,
                one_step_t=one_step_t, lora_scale=float(scale), lora_scale_from=scale_from,
                negative_prompt=negative_prompt, recipe=recipe.source,
                dtype=dtype, sigmas=sigmas, cfg=recipe.cfg)


def sampler_timesteps(k: int, T: int, one_step_t: int | None = None, exact: bool = True,
                      spacing: str = "trailing") -> list[int]:
    """hypersd's k-step timesteps (the segment boundaries, which exist where k divides T). Where
    they do not exist and ``exact`` is off (a published 12-step LoRA, a model alone), diffusers'
    DDIM trailing spacing, which the published recipes ran and which equals hypersd's wherever
    both exist; with ``exact`` on, the refusal of ``inference_timesteps``. ``spacing``: the
    teacher schedule's (SD3's "inclusive" grid has boundaries of its own, always used)."""
    from hypersd.core.schedule import inference_timesteps

    if exact or T % k == 0 or one_step_t is not None or spacing != "trailing":
        return inference_timesteps(k, T, one_step_t, spacing)
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ddim.set_timesteps(k)
    return [int(t) for t in ddim.timesteps]
