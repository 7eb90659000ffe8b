"""Distribution matching distillation for one step (HYPERSD.md §3), as small pure functions.

The generator maps noise to x0 in one student call at ``generator_t``. The real score is the
teacher with CFG; the fake score is a LoRA on the same UNet, trained by plain denoising on the
generator's samples. The generator follows (x0_fake − x0_real), normalised per sample.

Multi-step DMD (DMD2's backward simulation): the generator step may instead be step i of the
student's own k-step sampler, taken from where that sampler, run from noise without gradient,
puts x at its i-th timestep; the same gradient then applies to that step's x0.
"""

from __future__ import annotations

import torch

from hypersd.core.sampling import sample_tcd_until
from hypersd.core.solver import add_noise, as_schedule, denoise


def generate(eps_fn, noise: torch.Tensor, t: int, alphas_cumprod) -> torch.Tensor:
    """x = x0(noise, f(noise, t), t): the one-step generator."""
    return denoise(eps_fn, noise, t, alphas_cumprod)


def draw_generator_step(generator_steps: list[int], generator=None) -> tuple[int, int]:
    """(k, i): a step count of ``generator_steps``, then one step of its sampler, each uniformly.

    A list of one step count draws no k, and k = 1 draws no i: the one-step generator alone
    ([1]) takes nothing from the random stream, so its runs repeat those made before the option."""
    k = generator_steps[0] if len(generator_steps) == 1 else \
        generator_steps[int(torch.randint(len(generator_steps), (1,), generator=generator))]
    return k, 0 if k == 1 else int(torch.randint(k, (1,), generator=generator))


@torch.no_grad()
def simulate(eps_fn, noise: torch.Tensor, timesteps: list[int], stop: int, schedule, *, eta: float = 0.0,
             generator=None) -> torch.Tensor:
    """x at timesteps[stop]: the student's own sampler (at the eta it samples with) run from noise,
    without gradient, for its first ``stop`` steps; the noise itself at stop 0."""
    return sample_tcd_until(eps_fn, noise, timesteps, stop, schedule, eta=eta, generator=generator)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake − x0_real) / mean|x − x0_real| per sample: the KL gradient, scale-free."""
    norm = (x - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6)
    return (x0_fake - x0_real) / norm.view(-1, *[1] * (x.dim() - 1))


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x − stopgrad(x − g)‖²: its gradient in x is exactly g (mean over elements)."""
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def regression_loss(x: torch.Tensor, x_ode: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """The one-step sample against the teacher's ODE output from the same noise (DMD's regulariser).

    Where the one-step map cannot follow the target pointwise, "mse"'s best compromise for a pixel is
    the mean of the targets it cannot tell apart (grey where some are black and some white), "l1"'s
    their median (black where most are black).
    """
    diff = x - x_ode.detach()
    if distance == "mse":
        return diff.pow(2).mean()
    if distance == "l1":
        return diff.abs().mean()
    raise ValueError(f"unknown regression distance {distance!r}")


def red_loss(x: torch.Tensor, x0_denoised: torch.Tensor) -> torch.Tensor:
    """½‖x − stopgrad(D(x))‖², D the real score's x0 from x at low noise: regularisation by
    denoising (Romano et al., 2017). Its gradient in x is x − D(x): at a noise level a speck survives
    but a stroke's detail does not drown, the teacher takes off what is not data and keeps what is,
    so the push falls on the specks. Unlike DMD's (fake − real) it is biased towards the teacher's
    smoothing at that level: kept to low noise, that bias is small."""
    return 0.5 * (x - x0_denoised.detach()).pow(2).mean()


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
