"""Few-step samplers as small pure functions with one signature.

``sampler(eps_fn, x, timesteps, alphas_cumprod, *, eta, generator) -> x0``, where
``eps_fn(x, t) -> ε`` hides the network, its prompts and its guidance (see ``guided``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .schedule import CLEAN, alpha_bar, inference_timesteps
from .solver import ddim_jump
from .teachers.base import Cond, Teacher

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def sample_tcd(eps_fn: EpsFn, x, timesteps, alphas_cumprod, *, eta: float = 0.0, generator=None):
    """HYPERSD.md §4: at each step jump to s = floor((1−γ)·t_next), then re-noise s → t_next.

    γ = ``eta`` = 0 is DDIM on the given (trailing) timesteps; the last step returns x0.
    """
    timesteps = [int(t) for t in timesteps]
    for i, t in enumerate(timesteps):
        eps = eps_fn(x, t)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        s = CLEAN if t_next == CLEAN else math.floor((1 - eta) * t_next)
        x = ddim_jump(x, eps, t, s, alphas_cumprod)
        if t_next != CLEAN and s != t_next:
            ratio = alpha_bar(alphas_cumprod, t_next) / alpha_bar(alphas_cumprod, s)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * noise
    return x


def guided(teacher: Teacher, cond: Cond, w: float) -> EpsFn:
    """ε_fn with classifier-free guidance ω = w; w = 1 is the conditional model alone."""
    if w == 1.0:
        return lambda x, t: teacher.eps(x, t, cond)
    uncond = teacher.empty_cond(len(cond))
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
    timesteps = inference_timesteps(steps, teacher.T, one_step_t)
    acp = teacher.alphas_cumprod.to(teacher.device)
    out = []
    for i in range(0, len(prompts), batch_size):
        cond = teacher.encode_prompt(prompts[i:i + batch_size])
        x = noise[i:i + batch_size].to(teacher.device)  # float32: the network call casts its own input
        out.append(sample_tcd(guided(teacher, cond, w), x, timesteps, acp, eta=eta, generator=g).float().cpu())
    return torch.cat(out)
