"""The DDIM solver pieces: x0 from ε, the jump Ψ, and classifier-free guidance.

All of them compute in float32 whatever their inputs' dtype: a bf16 jump from t = 999 to the
clean end is off by about 0.025 RMS on unit-variance latents (√(1−ᾱ) alone rounds from 0.99767
to 0.99609), against 4e-7 in float32. Only the network runs in low precision (``Teacher.eps``).
"""

from __future__ import annotations

import torch

from .schedule import alpha_bar


def _b(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.float().reshape(-1, *([1] * (x.dim() - 1)))


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 promoted, float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t, with ᾱ_t per sample."""
    a_t = _b(a_t, x_t)
    return (_up(x_t) - (1 - a_t).sqrt() * _up(eps)) / a_t.sqrt()


def denoise(eps_fn, x_t: torch.Tensor, t, alphas_cumprod) -> torch.Tensor:
    """x0 that ``eps_fn`` predicts from x_t at t (an int, or one timestep per sample)."""
    return predict_x0(x_t, eps_fn(x_t, t), alpha_bar(alphas_cumprod, t).to(x_t.device))


def ddim_jump(x_t, eps, t, s, alphas_cumprod) -> torch.Tensor:
    """Ψ(x_t, ε, t → s) = √ᾱ_s·x0 + √(1−ᾱ_s)·ε; s = CLEAN returns x0, s = t returns x_t."""
    a_t, a_s = alpha_bar(alphas_cumprod, t), alpha_bar(alphas_cumprod, s)
    x0 = predict_x0(x_t, eps, a_t)
    a_s = _b(a_s, x_t)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * _up(eps)


def add_noise(x0, noise, t, alphas_cumprod) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
    a = _b(alpha_bar(alphas_cumprod, t), x0)
    return a.sqrt() * _up(x0) + (1 - a).sqrt() * _up(noise)


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w) -> torch.Tensor:
    """ε_ω = ε_u + ω·(ε_c − ε_u); ω a number or one per sample."""
    eps_cond, eps_uncond = _up(eps_cond), _up(eps_uncond)
    w = torch.as_tensor(w, dtype=eps_cond.dtype, device=eps_cond.device)
    if w.dim() == 1:
        w = _b(w, eps_cond)
    return eps_uncond + w * (eps_cond - eps_uncond)
