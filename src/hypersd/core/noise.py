"""The noise schedule, defined once: x_t = α_t·x0 + σ_t·ε, and how a network's output reads on it.

Every loss and sampler takes a ``NoiseSchedule`` (HYPERSD.md §5). Timesteps are the family's own
integer units, so the solver grid and the segments (``hypersd.core.schedule``) serve both families:

- DDPM (SD1.5, SDXL, SD2): t ∈ {0..T-1} indexes the ᾱ table; α = √ᾱ_t, σ = √(1−ᾱ_t). The
  network predicts ε or v = α·ε − σ·x0.
- Rectified flow (SD3, FLUX): t ∈ {0..T-1} indexes an unshifted time u_t, and σ_t = shift(u_t),
  α = 1 − σ; the network predicts v = ε − x0. The u grid is laid out so that the k-step sigmas of
  diffusers' stock FlowMatchEulerDiscreteScheduler are grid points (see ``FlowSchedule``).

``CLEAN`` (−1) is α = 1, σ = 0 in both. Every coefficient is float32 (bf16 jumps are off by ~0.025
RMS near t = 999; see ``hypersd.core.solver``), whatever the input's dtype; only the network runs low.
"""

from __future__ import annotations

import math

import torch

from hypersd.core.schedule import CLEAN, SolverGrid, alpha_bar, inference_timesteps
from hypersd.errors import HypersdError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _b(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (or scalar) coefficient shaped to broadcast over x, float32, on x's device."""
    return a.float().to(x.device).reshape(-1, *([1] * (x.dim() - 1)))


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 promoted, float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class NoiseSchedule:
    """x_t = α_t·x0 + σ_t·ε, with the network's parameterisation; t in the family's integer units."""

    T: int
    spacing: str  # how k-step boundaries and the solver grid lie on {0..T-1}: see hypersd.core.schedule
    prediction_type: str
    sampler: str  # the deterministic sampler on it (TCD at eta 0), as tables name the teacher's rows

    # -- the schedule --------------------------------------------------------------------
    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def model_timestep(self, t) -> torch.Tensor:
        """What the network is called with at t."""
        raise NotImplementedError

    def tcd_point(self, t_next: int, gamma: float):
        """Where a TCD step with γ jumps to before re-noising to t_next (HYPERSD.md §4)."""
        raise NotImplementedError

    # -- grids ---------------------------------------------------------------------------
    def inference_timesteps(self, k: int, one_step_t: int | None = None) -> list[int]:
        return inference_timesteps(k, self.T, one_step_t, self.spacing)

    def solver_grid(self, N: int) -> SolverGrid:
        return SolverGrid(self.T, N, self.spacing)

    # -- reading the network's output ----------------------------------------------------
    def to_x0_eps(self, x_t: torch.Tensor, out: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from the network's output at t, by its parameterisation."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """What the network should output for x_t = add_noise(x0, eps, t): a denoising loss's target."""
        raise NotImplementedError

    def jump(self, x_t: torch.Tensor, out: torch.Tensor, t, s) -> torch.Tensor:
        """Ψ(x_t, t → s) = α_s·x̂0 + σ_s·ε̂; s = CLEAN returns x̂0, s = t returns x_t."""
        x0, eps = self.to_x0_eps(x_t, out, t)
        x_s = _b(self.alpha(s), x_t) * x0 + _b(self.sigma(s), x_t) * eps
        return self._keep_where_same(x_t, x_s, t, s)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = α_t·x0 + σ_t·ε."""
        return _b(self.alpha(t), x0) * _up(x0) + _b(self.sigma(t), x0) * _up(noise)

    def renoise(self, x_s: torch.Tensor, s, t, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_t given x_s, for t later than s: the forward transition of the schedule.

        x_t = (α_t/α_s)·x_s + √(σ_t² − (α_t·σ_s/α_s)²)·ε, so that x_t given x0 has mean α_t·x0 and
        variance σ_t² when x_s has α_s·x0 and σ_s²."""
        a_s, a_t = self.alpha(s), self.alpha(t)
        s_s, s_t = self.sigma(s), self.sigma(t)
        ratio = a_t / a_s
        var = (s_t.pow(2) - (ratio * s_s).pow(2)).clamp(min=0)
        return _b(ratio, x_s) * _up(x_s) + _b(var.sqrt(), x_s) * _up(noise)

    def denoise(self, model_fn, x_t: torch.Tensor, t) -> torch.Tensor:
        """x̂0 that ``model_fn(x, t)`` predicts from x_t at t."""
        return self.to_x0_eps(x_t, model_fn(x_t, t), t)[0]

    @staticmethod
    def _keep_where_same(x_t, x_s, t, s):
        # torch.where, not a branch on same.any(): no host sync inside a training step
        same = torch.as_tensor(t, device=x_t.device) == torch.as_tensor(s, device=x_t.device)
        return torch.where(same.reshape(-1, *([1] * (x_t.dim() - 1))), _up(x_t), x_s)


class DDPMSchedule(NoiseSchedule):
    """The ᾱ table of a DDPM teacher; ε- or v-prediction."""

    spacing = "trailing"
    sampler = "DDIM"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise HypersdError(f"unknown prediction_type {prediction_type!r} for a DDPM teacher; "
                               f"choose one of {', '.join(PREDICTION_TYPES)} (flow models use FlowSchedule)")
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self._tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_scheduler_config(cls, config: dict, declared: str | None = None) -> "DDPMSchedule":
        """The schedule of a diffusers scheduler config; ``declared`` (a recipe's claim) must agree with it."""
        from diffusers import DDPMScheduler

        kind = config.get("prediction_type", "epsilon")
        if declared is not None and declared != kind:
            raise HypersdError(f"the teacher is declared {declared!r} but its scheduler config says it predicts "
                               f"{kind!r}; set prediction_type: {kind} (or leave it out to read it from the model)")
        return cls(DDPMScheduler.from_config(config).alphas_cumprod.float(), kind)

    @property
    def T(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _abar(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = self.alphas_cumprod.to(t.device)
        return alpha_bar(table, t)

    def alpha(self, t) -> torch.Tensor:
        return self._abar(t).sqrt()

    def sigma(self, t) -> torch.Tensor:
        return (1 - self._abar(t)).sqrt()

    def model_timestep(self, t) -> torch.Tensor:
        return torch.as_tensor(t)

    def tcd_point(self, t_next: int, gamma: float):
        # TCDScheduler's prev_step_timestep: floor((1−γ)·t_next), an integer timestep
        return CLEAN if t_next == CLEAN else math.floor((1 - gamma) * t_next)

    def to_x0_eps(self, x_t, out, t):
        a, s = _b(self.alpha(t), x_t), _b(self.sigma(t), x_t)
        x_t, out = _up(x_t), _up(out)
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a, out
        return a * x_t - s * out, s * x_t + a * out  # v = α·ε − σ·x0, and α² + σ² = 1

    def target(self, x0, eps, t):
        if self.prediction_type == "epsilon":
            return _up(eps)
        return _b(self.alpha(t), x0) * _up(eps) - _b(self.sigma(t), x0) * _up(x0)

    def renoise(self, x_s, s, t, noise):
        # √(ᾱ_t/ᾱ_s)·x + √(1−ᾱ_t/ᾱ_s)·ε: the general form, written as TCDScheduler does
        ratio = self._abar(t) / self._abar(s)
        return _b(ratio.sqrt(), x_s) * _up(x_s) + _b((1 - ratio).sqrt(), x_s) * _up(noise)


def shift_sigma(u, shift: float):
    """SD3's shift σ' = s·u / (1 + (s−1)·u)."""
    return shift * u / (1 + (shift - 1) * u)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """diffusers' ``calculate_shift``: mu grows linearly with the image's token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


# FLUX's integer timesteps index u_t = (t+1)/T (trailing). Its transformer takes σ itself, so T is
# hypersd's grid resolution, not a training constant: 1200, not the scheduler's 1000, holds
# FluxPipeline's k-step sigmas linspace(1, 1/k, k) for every k dividing 1200 (1, 2, 3, 4, 6, 8, 12,
# 16, ...: 1000 holds 8 but not 16), with solver grids N = 40 (k up to 8) and N = 48 (k up to 16).
FLUX_T = 1200


def flux_shift(image_seq_len: int, **kwargs) -> float:
    """The static shift equal to FLUX's dynamic one: the exponential time shift
    e^mu / (e^mu + (1/u − 1)) is exactly s·u / (1 + (s−1)·u) with s = e^mu.

    ``image_seq_len`` is the transformer's token count: (H/16)·(W/16) for an H×W image."""
    return math.exp(flux_mu(image_seq_len, **kwargs))


class FlowSchedule(NoiseSchedule):
    """Rectified flow x = (1−σ)·x0 + σ·ε with v = ε − x0; t ∈ {0..T-1} indexes σ_t = shift(u_t).

    ``spacing`` places the unshifted times u_t so that a k-step sampler's boundaries are the sigmas
    of diffusers' FlowMatchEulerDiscreteScheduler (both computed from the same u, shift applied once):

    - "inclusive" (SD3: the pipeline calls ``set_timesteps(k)``): diffusers' k-step u's are a
      linspace from 1 to sigma_min = shift(1/1000) (sic: the stored, already shifted minimum), both
      ends kept. u_t = m + (1−m)·t/(T−1) puts them on t = T-1 − j·(T-1)/(k-1); T = 841 holds
      every k with k−1 dividing 840 (k = 1..9, 11, 13, 15, 16, ...).
    - "trailing" (FLUX: the pipeline passes sigmas = linspace(1, 1/k, k)): u_t = (t+1)/T puts
      them on DDPM's trailing boundaries T-1 − j·T/k, for every k dividing T (FLUX: ``FLUX_T``).

    ``timestep_scale``: the network is called with scale·σ (SD3: 1000; FLUX: 1, its transformer
    scales by 1000 itself)."""

    prediction_type = "flow"
    sampler = "Euler"

    def __init__(self, shift: float = 1.0, timestep_scale: float = 1000.0, spacing: str = "inclusive",
                 T: int | None = None, num_train_timesteps: int = 1000):
        if not shift > 0:
            raise HypersdError(f"flow shift must be positive, got {shift}")
        self.shift, self.timestep_scale, self.spacing = float(shift), float(timestep_scale), spacing
        if spacing == "inclusive":
            self.T = 841 if T is None else T
            # the stock scheduler's sigma_min: float32 shift(1/1000) of its training table, as it stores it
            table = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32) / num_train_timesteps
            m = float(shift_sigma(table, self.shift)[0])
            u = m + (1 - m) * torch.arange(self.T, dtype=torch.float64) / (self.T - 1)
        elif spacing == "trailing":
            self.T = num_train_timesteps if T is None else T
            u = torch.arange(1, self.T + 1, dtype=torch.float64) / self.T
        else:
            raise HypersdError(f"unknown flow spacing {spacing!r}; choose 'inclusive' (SD3) or 'trailing' (FLUX)")
        self.u = torch.cat([torch.zeros(1, dtype=torch.float64), u])  # u[t+1]; CLEAN (t = −1) is u = 0
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _u(self, t) -> torch.Tensor:
        """u at t, float64; a fractional t (a TCD point) interpolates linearly between grid points."""
        t = torch.as_tensor(t)
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = self.u.to(t.device)
        pos = (t.to(torch.float64) + 1).clamp(0, self.T)
        i = pos.floor().long().clamp(max=self.T - 1)
        return table[i] + (pos - i) * (table[i + 1] - table[i])

    def sigma(self, t) -> torch.Tensor:
        return shift_sigma(self._u(t), self.shift).float()

    def alpha(self, t) -> torch.Tensor:
        return 1 - self.sigma(t)

    def model_timestep(self, t) -> torch.Tensor:
        return self.sigma(t) * self.timestep_scale

    def tcd_point(self, t_next, gamma: float):
        """The point with σ_s = (1−γ)·σ_next (flow's time is σ): γ = 1 is the clean end (LCM).

        A γ step of ``sampling.sample_tcd`` from σ_t, with the network's v: the Euler jump
        x_s = x_t + (σ_s − σ_t)·v, then the forward transition of the schedule to σ_next,
        x_next = (α_next/α_s)·x_s + √(σ_next² − (α_next·σ_s/α_s)²)·z with α = 1 − σ (``renoise``).
        Against diffusers (tests/test_flow_sampling.py):

        - γ = 0 is FlowMatchEulerDiscreteScheduler on the same sigmas (no noise drawn).
        - γ = 1 is FlowMatchLCMScheduler: x̂0 = x_t − σ_t·v, x_next = (1 − σ_next)·x̂0 + σ_next·z,
          the last step x̂0. Equal given the same noise: both draw one torch.randn of x's shape per
          step from the generator (LCM draws one more at its last step, where σ_next = 0 cancels it,
          so only the generator's state afterwards differs).
        - 0 < γ < 1 has no diffusers counterpart: FlowMatchLCMScheduler has no γ, and TCDScheduler
          is DDPM's, whose s = floor((1−γ)·t_next) is a fraction of the timestep, not of σ (under a
          shift the two differ). s is a fractional timestep; σ_s is exact (u is linear in t).
        - Not modelled: LCM's ``scale_factors`` / ``upscale_mode`` (x̂0 resized between steps)."""
        if t_next == CLEAN or gamma >= 1:
            return CLEAN
        if gamma <= 0:
            return t_next
        target = (1 - gamma) * float(shift_sigma(self._u(t_next), self.shift))
        u = target / (self.shift - (self.shift - 1) * target)  # the inverse shift
        i = int(torch.searchsorted(self.u, torch.tensor(u, dtype=torch.float64))) - 1
        i = min(max(i, 0), self.T - 1)
        return i - 1 + (u - float(self.u[i])) / float(self.u[i + 1] - self.u[i])

    def to_x0_eps(self, x_t, out, t):
        s = _b(self.sigma(t), x_t)
        x_t, v = _up(x_t), _up(out)
        return x_t - s * v, x_t + (1 - s) * v

    def target(self, x0, eps, t):
        return _up(eps) - _up(x0)

    def jump(self, x_t, out, t, s):
        # (1−σ_s)·x̂0 + σ_s·ε̂ is exactly the Euler step; this form is the one diffusers computes
        dt = self.sigma(s) - self.sigma(t)
        return _up(x_t) + _b(dt, x_t) * _up(out)

    def pipeline_sigmas(self, k: int) -> list[float]:
        """What to pass as ``sigmas=`` to a stock FlowMatchEulerDiscreteScheduler (with this
        schedule's shift, or ``mu = log(shift)`` under dynamic shifting) for this k-step sampler:
        the unshifted u of the boundaries, since the scheduler applies its shift to what it is given."""
        return [float(self.u[t + 1]) for t in self.inference_timesteps(k)]

    def timesteps_for_sigmas(self, sigmas, grid: SolverGrid | None = None, tol: float = 1e-6) -> list[int]:
        """The timesteps whose σ are ``sigmas`` (an inference scheduler's, without its final 0),
        refused where one is not a point of this schedule (or of ``grid``): the shift differs."""
        where = grid.points if grid is not None else torch.arange(self.T)
        table = self.sigma(where).double()
        out = []
        for j, sig in enumerate(float(x) for x in sigmas):
            d = (table - sig).abs()
            i = int(d.argmin())
            if d[i] > tol:
                raise HypersdError(
                    f"sigma {sig:.6f} (step {j + 1} of {len(sigmas)}) is not on the flow "
                    f"{'solver grid' if grid is not None else 'schedule'} of shift {self.shift:g} "
                    f"({self.spacing} spacing, T={self.T}); the inference scheduler's shift differs from the "
                    f"training one (for FLUX: another resolution); train with that shift, or sample with "
                    f"shift={self.shift:g} and the sigmas of this schedule's inference_timesteps")
            out.append(int(where[i]))
        return out
