"""The solver pieces: x0 from the network's output, the jump Ψ, noising, classifier-free guidance.

Each takes the teacher's ``NoiseSchedule`` (``hypersd.core``); a bare ``alphas_cumprod`` table is
read as an ε-prediction DDPM schedule, as before the schedule existed.

All of them compute in float32 whatever their inputs' dtype: a bf16 jump from t = 999 to the
clean end is off by about 0.025 RMS on unit-variance latents (√(1−ᾱ) alone rounds from 0.99767
to 0.99609), against 4e-7 in float32. Only the network runs in low precision (``Teacher.eps``).
"""

from __future__ import annotations

import torch

from hypersd.core.noise import DDPMSchedule, NoiseSchedule, _b, _up


def as_schedule(schedule) -> NoiseSchedule:
    """A ``NoiseSchedule`` as it is; an ᾱ table as the ε-prediction DDPM schedule it defines."""
    return schedule if isinstance(schedule, NoiseSchedule) else DDPMSchedule(schedule)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t, with ᾱ_t per sample: ε-prediction only (any other
    output reads through its schedule's ``to_x0_eps``)."""
    a_t = _b(a_t, x_t)
    return (_up(x_t) - (1 - a_t).sqrt() * _up(eps)) / a_t.sqrt()


def denoise(model_fn, x_t: torch.Tensor, t, schedule) -> torch.Tensor:
    """x0 that ``model_fn`` predicts from x_t at t (an int, or one timestep per sample)."""
    return as_schedule(schedule).denoise(model_fn, x_t, t)


def ddim_jump(x_t, out, t, s, schedule) -> torch.Tensor:
    """Ψ(x_t, t → s) = α_s·x̂0 + σ_s·ε̂; s = CLEAN returns x̂0, s = t returns x_t."""
    return as_schedule(schedule).jump(x_t, out, t, s)


def add_noise(x0, noise, t, schedule) -> torch.Tensor:
    """x_t = α_t·x0 + σ_t·ε."""
    return as_schedule(schedule).add_noise(x0, noise, t)


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w) -> torch.Tensor:
    """ε_ω = ε_u + ω·(ε_c − ε_u); ω a number or one per sample (any output linear in x0 and ε: v too)."""
    eps_cond, eps_uncond = _up(eps_cond), _up(eps_uncond)
    w = torch.as_tensor(w, dtype=eps_cond.dtype, device=eps_cond.device)
    if w.dim() == 1:
        w = _b(w, eps_cond)
    return eps_uncond + w * (eps_cond - eps_uncond)
