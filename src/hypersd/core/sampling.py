"""Few-step samplers as small pure functions with one signature.

``sampler(model_fn, x, timesteps, schedule, *, eta, generator) -> x0``, where
``model_fn(x, t)`` returns the network's output (ε, v, or flow's v) and hides the network, its
prompts and its guidance (see ``guided``); ``schedule`` is the teacher's ``NoiseSchedule``.
"""

from __future__ import annotations

from typing import Callable

import torch

from hypersd.core.schedule import CLEAN
from hypersd.core.solver import as_schedule
from hypersd.teachers.base import Cond, Teacher

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def sample_tcd(model_fn: EpsFn, x, timesteps, schedule, *, eta: float = 0.0, generator=None):
    """HYPERSD.md §4: at each step jump to the TCD point s of t_next, then re-noise s → t_next.

    DDPM: s = floor((1−γ)·t_next) (TCDScheduler); flow: σ_s = (1−γ)·σ_next (γ = 1 is
    FlowMatchLCMScheduler). γ = ``eta`` = 0 is DDIM / Euler on the given timesteps; the last step
    returns x0. ``schedule`` may be a bare ᾱ table (an ε-prediction DDPM teacher).
    """
    return sample_tcd_until(model_fn, x, timesteps, len(timesteps), schedule, eta=eta, generator=generator)


def sample_tcd_until(model_fn: EpsFn, x, timesteps, stop: int, schedule, *, eta: float = 0.0, generator=None):
    """The first ``stop`` steps of ``sample_tcd``: x at timesteps[stop], where the rest of the
    sampler would go on from (DMD's backward simulation of the student's own sampler); at
    stop = len(timesteps), the whole sampler's x0."""
    schedule = as_schedule(schedule)
    timesteps = [int(t) for t in timesteps]

    def draw(x):
        return torch.randn(x.shape, generator=generator).to(x.device)

    for i in range(stop):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        x = tcd_step(schedule, x, model_fn(x, timesteps[i]), timesteps[i], t_next, eta, draw)
    return x


def tcd_step(schedule, x, out, t: int, t_next: int, eta: float, draw):
    """One step of the TCD form from t with the network's output ``out``: jump to the TCD point s
    of t_next, then re-noise s → t_next with ``draw(x)`` (called only where noise is added: never at
    γ = 0 nor at the last step, t_next = CLEAN). ``sample_tcd`` and the flow pipelines' scheduler
    (``hypersd.inference.schedulers``) both step with it, so they are one sampler."""
    s = schedule.tcd_point(t_next, eta)
    x = schedule.jump(x, out, t, s)
    if t_next != CLEAN and s != t_next:
        x = schedule.renoise(x, s, t_next, draw(x))
    return x


def guided(teacher: Teacher, cond: Cond, w: float) -> EpsFn:
    """ε_fn with classifier-free guidance ω = w; w = 1 is the conditional model alone. A guidance-
    distilled teacher (FLUX.1-dev) takes every ω, 1 included, as its guidance embedding (``eps_cfg``)."""
    if w == 1.0 and not getattr(teacher, "guidance_embeds", False):
        return lambda x, t: teacher.eps(x, t, cond)
    uncond = cond.unconditional(teacher.empty_cond(1))  # with the prompts' own size ids (SDXL), as the pipeline
    return lambda x, t: teacher.eps_cfg(x, t, cond, uncond, w)


def initial_noise(n: int, shape, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T for a seed; the returned generator then drives any re-noising, so runs repeat."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g), g


@torch.no_grad()
def sample_prompts(teacher: Teacher, prompts: list[str], steps: int, *, guidance: float | None = None,
                   eta: float = 0.0, seed: int = 0, batch_size: int = 1000,
                   one_step_t: int | None = None) -> torch.Tensor:
    """Latents x0 for ``prompts`` with the teacher's UNet as it is now (adapters on or off)."""
    w = teacher.default_guidance if guidance is None else guidance
    noise, g = initial_noise(len(prompts), teacher.latent_shape, seed)
    schedule = teacher.schedule
    timesteps = schedule.inference_timesteps(steps, one_step_t)
    out = []
    for i in range(0, len(prompts), batch_size):
        cond = teacher.encode_prompt(prompts[i:i + batch_size])
        x = noise[i:i + batch_size].to(teacher.device)  # float32: the network call casts its own input
        out.append(sample_tcd(guided(teacher, cond, w), x, timesteps, schedule, eta=eta, generator=g).float().cpu())
    return torch.cat(out)
