"""diffusers' DDIM (trailing) and TCD, both ending at x0 as hypersd's sampler does; for SD3 and
FLUX, FlowMatchEulerDiscreteScheduler, or its subclass stepping as hypersd's TCD sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypersd.errors import HypersdError

if TYPE_CHECKING:
    from hypersd.inference.plan import Plan

SCHEDULERS = ("tcd", "ddim")


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


def make_flow_scheduler(config: dict, shift: float, eta: float = 0.0, schedule=None, timesteps=None):
    """diffusers' FlowMatchEulerDiscreteScheduler on the model's config with hypersd's static shift:
    a FLUX model's dynamic shift is taken at the resolution it is distilled at, whatever the image
    size, so the sigmas are the teacher's boundaries at every size (Euler is hypersd's γ = 0).

    ``eta`` > 0: its subclass that steps as hypersd's sampler does (``sampling.tcd_step`` on the
    teacher's ``schedule`` and hypersd's ``timesteps``), drawing its re-noising from ``draw``, which
    the caller sets per batch (the pipelines call ``step`` without a generator)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = _flow_tcd_class() if eta > 0 else FlowMatchEulerDiscreteScheduler
    scheduler = cls.from_config(config, shift=shift, use_dynamic_shifting=False)
    if eta > 0:
        scheduler.hypersd = (schedule, [int(t) for t in timesteps], float(eta))
    return scheduler


def flow_call_args(plan: Plan, schedule) -> dict:
    """The pipeline arguments that put a flow scheduler on ``plan.timesteps``: the unshifted u of
    each boundary, as ``FlowSchedule.pipeline_sigmas`` gives them (the scheduler applies the shift)."""
    if plan.sigmas is not None:  # a published recipe: the stock pipeline's own sigmas
        return {"sigmas": list(plan.sigmas)}
    return {"sigmas": [float(schedule.u[t + 1]) for t in plan.timesteps]}


_FLOW_TCD = None


def _flow_tcd_class():
    """FlowMatchEulerDiscreteScheduler whose step is hypersd's TCD step with γ = eta: the jump to
    σ_s = (1−γ)·σ_next, then the re-noising to σ_next (γ = 1 is FlowMatchLCMScheduler). The
    scheduler's own sigmas only place the pipeline's transformer calls; they are checked against
    the schedule's after each run (``Generator._flow_latents``)."""
    global _FLOW_TCD
    if _FLOW_TCD is None:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
            FlowMatchEulerDiscreteSchedulerOutput,
        )

        from hypersd.core.sampling import tcd_step
        from hypersd.core.schedule import CLEAN

        class HypersdFlowTCDScheduler(FlowMatchEulerDiscreteScheduler):
            hypersd = None  # (schedule, timesteps, eta)
            draw = None  # draw(x): the re-noising of a batch, from its images' own generators

            def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
                if self.draw is None:
                    raise HypersdError("the flow TCD scheduler has no noise source; set its draw before sampling")
                if self.step_index is None:
                    self._init_step_index(timestep)
                schedule, timesteps, eta = self.hypersd
                i = self.step_index
                t_next = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
                x = tcd_step(schedule, sample, model_output, timesteps[i], t_next, eta, self.draw)
                self._step_index += 1
                x = x.to(model_output.dtype)
                return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=x) if return_dict else (x,)

        _FLOW_TCD = HypersdFlowTCDScheduler
    return _FLOW_TCD


def stock_flow_sigmas(backbone: str, k: int, schedule) -> list[float]:
    """The unshifted sigmas (u) the stock pipeline samples k steps on, which the published Hyper-SD3
    and Hyper-FLUX recipes ran: FluxPipeline's default ``linspace(1, 1/k, k)``;
    StableDiffusion3Pipeline's scheduler's ``set_timesteps(k)``, a linspace of u from 1 to the
    scheduler's sigma_min (which hypersd's SD3 schedule holds as its u at t = 0)."""
    import numpy as np

    if backbone == "flux":
        return [float(u) for u in np.linspace(1.0, 1.0 / k, k)]
    return [float(u) for u in np.linspace(1.0, float(schedule.u[1]), k)]


_TCD = None


def _tcd_class():
    """diffusers' TCDScheduler whose last step returns x0 (hypersd's sampler) instead of the
    ᾱ_0-noised x0; every other step is diffusers' own."""
    global _TCD
    if _TCD is None:
        from diffusers import TCDScheduler
        from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

        from hypersd.core.noise import DDPMSchedule

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
