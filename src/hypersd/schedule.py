"""The timestep grid and its segments: defined once, used by training and inference.

HYPERSD.md, "The timestep grid and the segments". Timesteps are integer tensors; the clean
end (ᾱ = 1, the jump returns x0) is the integer ``CLEAN``.
"""

from __future__ import annotations

import torch

from .errors import HypersdError

CLEAN = -1


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for integer timesteps ``t`` (``CLEAN`` gives 1), as float32 of t's shape."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    a = alphas_cumprod[t.clamp(min=0)]
    return torch.where(t < 0, torch.ones_like(a), a).float()


def trailing(T: int, n: int) -> list[int]:
    """``T-1 - i*T/n`` for i < n: DDIM's trailing spacing, from T-1 down."""
    if n < 1 or T % n:
        raise HypersdError(f"{n} steps do not divide the {T} training timesteps; pick a divisor of {T}")
    return [T - 1 - i * (T // n) for i in range(n)]


def inference_timesteps(k: int, T: int = 1000, one_step_t: int | None = None) -> list[int]:
    """The timesteps of a k-step sampler: exactly the k segment boundaries b_0..b_{k-1}.

    ``one_step_t``: a dedicated one-step generator (DMD's ``generator_t``, e.g. 800) is sampled
    at that timestep instead of T-1 when k = 1."""
    if k == 1 and one_step_t is not None:
        return [int(one_step_t)]
    return trailing(T, k)


class SolverGrid:
    """The teacher solver's N-point trailing grid τ_0 > τ_1 > ... > τ_{N-1}."""

    def __init__(self, T: int = 1000, N: int = 40):
        self.T, self.N = T, N
        self.points = torch.tensor(trailing(T, N))

    def step_down(self, t: torch.Tensor) -> torch.Tensor:
        """The next grid point towards 0 (one solver step); ``CLEAN`` below the lowest."""
        t = torch.as_tensor(t)
        down = t - self.T // self.N
        return torch.where(down < 0, torch.full_like(down, CLEAN), down)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.points[torch.randint(0, self.N, (n,), generator=generator)]


class Segments:
    """k segments of the trajectory; segment j holds t in (b_{j+1}, b_j]."""

    def __init__(self, k: int, grid: SolverGrid):
        self.k, self.grid = k, grid
        self.boundaries = inference_timesteps(k, grid.T)
        on_grid = set(grid.points.tolist())
        off = [b for b in self.boundaries if b not in on_grid]
        if off:
            raise HypersdError(
                f"segment boundaries {off} of k={k} are not on the N={grid.N} solver grid "
                f"(T={grid.T}); choose N a multiple of {k}, e.g. N=40 for k in 1, 2, 4, 8"
            )
        # lower[j] is segment j's lower end: b_{j+1}, or CLEAN for the last.
        self._lower = torch.tensor(self.boundaries[1:] + [CLEAN])

    def lower_boundary(self, t: torch.Tensor) -> torch.Tensor:
        """The lower boundary t_b of the segment holding each t."""
        t = torch.as_tensor(t)
        j = (self.grid.T - 1 - t).div(self.grid.T // self.k, rounding_mode="floor")
        return self._lower[j.clamp(0, self.k - 1)]
