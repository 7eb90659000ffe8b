"""diffusers' DDIM (trailing) and TCD, both ending at x0 as hypersd's sampler does."""

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


def make_flow_scheduler(config: dict, shift: float):
    """diffusers' FlowMatchEulerDiscreteScheduler on the model's config with hypersd's static shift:
    a FLUX model's dynamic shift is taken at the resolution it is distilled at, whatever the image
    size, so the sigmas are the teacher's boundaries at every size (Euler is hypersd's γ = 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift, use_dynamic_shifting=False)


def flow_call_args(plan: Plan, schedule) -> dict:
    """The pipeline arguments that put a flow scheduler on ``plan.timesteps``: the unshifted u of
    each boundary, as ``FlowSchedule.pipeline_sigmas`` gives them (the scheduler applies the shift).

    Euler only: the SD3 and FLUX pipelines step their scheduler without the seed's generator, so
    FlowMatchLCMScheduler's re-noising (γ = 1) would not follow the seed, and 0 < γ < 1 has no
    diffusers scheduler."""
    if plan.eta > 0:
        raise HypersdError(f"--eta {plan.eta:g}: SD3 and FLUX generate with the Euler sampler only (eta 0); "
                           f"pass --eta 0")
    if plan.sigmas is not None:
        return {"sigmas": list(plan.sigmas)}
    return {"sigmas": [float(schedule.u[t + 1]) for t in plan.timesteps]}


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
