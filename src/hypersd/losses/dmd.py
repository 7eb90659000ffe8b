"""Distribution matching distillation for one step (HYPERSD.md §3), as small pure functions.

The generator maps noise to x0 in one student call at ``generator_t``. The real score is the
teacher with CFG; the fake score is a LoRA on the same UNet, trained by plain denoising on the
generator's samples. The generator follows (x0_fake − x0_real), normalised per sample.
"""

from __future__ import annotations

import torch

from hypersd.core.solver import add_noise, as_schedule, denoise


def generate(eps_fn, noise: torch.Tensor, t: int, alphas_cumprod) -> torch.Tensor:
    """x = x0(noise, f(noise, t), t): the one-step generator."""
    return denoise(eps_fn, noise, t, alphas_cumprod)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake − x0_real) / mean|x − x0_real| per sample: the KL gradient, scale-free."""
    norm = (x - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6)
    return (x0_fake - x0_real) / norm.view(-1, *[1] * (x.dim() - 1))


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x − stopgrad(x − g)‖²: its gradient in x is exactly g (mean over elements)."""
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def denoising_loss(eps_fn, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod) -> torch.Tensor:
    """The fake score's loss: plain denoising (ε, v or flow's v, by the schedule) on the generator's
    (detached) samples. ``alphas_cumprod``: the teacher's schedule, or its bare ᾱ table."""
    schedule = as_schedule(alphas_cumprod)
    x_t = schedule.add_noise(x.detach(), noise, t)
    return (eps_fn(x_t, t) - schedule.target(x.detach(), noise, t)).pow(2).mean()


@torch.no_grad()
def score_x0(eps_fn, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod) -> torch.Tensor:
    """x0 that a score model predicts from x diffused to t."""
    return denoise(eps_fn, add_noise(x, noise, t, alphas_cumprod), t, alphas_cumprod)
