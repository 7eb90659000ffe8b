"""The timestep grid and its segments: defined once, used by training and inference.

HYPERSD.md, "The timestep grid and the segments". Timesteps are integer tensors; the clean
end (ᾱ = 1, the jump returns x0) is the integer ``CLEAN``.
"""

from __future__ import annotations

import torch

from hypersd.errors import HypersdError

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


def inclusive(T: int, n: int) -> list[int]:
    """``T-1 - j*(T-1)/(n-1)`` for j < n: n points from T-1 down to 0 inclusive.

    diffusers' FlowMatchEulerDiscreteScheduler spaces its default k-step sigmas so (a linspace
    from sigma_max to sigma_min, both ends kept); the flow family's "inclusive" grid mirrors it."""
    if n == 1:
        return [T - 1]
    if n < 1 or (T - 1) % (n - 1):
        raise HypersdError(f"{n} points do not split the {T - 1} intervals of the {T}-point grid evenly; "
                           f"pick n with n-1 dividing {T - 1} (with T=841: N=43 for a solver grid that holds "
                           f"the boundaries of k = 1, 2, 4, 8)")
    return [T - 1 - j * ((T - 1) // (n - 1)) for j in range(n)]


SPACINGS = {"trailing": trailing, "inclusive": inclusive}


def spaced(T: int, n: int, spacing: str = "trailing") -> list[int]:
    if spacing not in SPACINGS:
        raise HypersdError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return SPACINGS[spacing](T, n)


def inference_timesteps(k: int, T: int = 1000, one_step_t: int | None = None, spacing: str = "trailing") -> list[int]:
    """The timesteps of a k-step sampler: exactly the k segment boundaries b_0..b_{k-1}.

    ``one_step_t``: a dedicated one-step generator (DMD's ``generator_t``, e.g. 800) is sampled
    at that timestep instead of T-1 when k = 1."""
    if k == 1 and one_step_t is not None:
        return [int(one_step_t)]
    return spaced(T, k, spacing)


class SolverGrid:
    """The teacher solver's N-point grid τ_0 > τ_1 > ... > τ_{N-1} (trailing, or inclusive of 0)."""

    def __init__(self, T: int = 1000, N: int = 40, spacing: str = "trailing"):
        self.T, self.N, self.spacing = T, N, spacing
        self.points = torch.tensor(spaced(T, N, spacing))
        self._below = torch.cat([torch.tensor([CLEAN]), self.points.flip(0)])  # ascending, CLEAN first

    def step_down(self, t: torch.Tensor) -> torch.Tensor:
        """The next grid point below t (one solver step); ``CLEAN`` below the lowest."""
        return _largest_below(self._below, torch.as_tensor(t))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.points[torch.randint(0, self.N, (n,), generator=generator)]


class Segments:
    """k segments of the trajectory; segment j holds t in (b_{j+1}, b_j]."""

    def __init__(self, k: int, grid: SolverGrid):
        self.k, self.grid = k, grid
        self.boundaries = inference_timesteps(k, grid.T, spacing=grid.spacing)
        on_grid = set(grid.points.tolist())
        off = [b for b in self.boundaries if b not in on_grid]
        if off:
            rule = "N a multiple of k" if grid.spacing == "trailing" else "N with N-1 a multiple of k-1"
            n = holding_grid(k, grid)
            fix = f"choose {rule}" + ("" if n is None else f", e.g. N={n} for k in {_with_usual(k)}")
            raise HypersdError(
                f"segment boundaries {off} of k={k} are not on the N={grid.N} solver grid "
                f"(T={grid.T}, {grid.spacing} spacing); {fix}"
            )
        # Ascending, CLEAN first: a segment's lower end is the largest boundary below t.
        self._below = torch.tensor([CLEAN] + self.boundaries[::-1])

    def lower_boundary(self, t: torch.Tensor) -> torch.Tensor:
        """The lower boundary t_b of the segment holding each t: b_{j+1} for t in (b_{j+1}, b_j]."""
        return _largest_below(self._below, torch.as_tensor(t))


USUAL_K = (1, 2, 4, 8)  # the step counts of the unified LoRA, which one solver grid should hold
DEFAULT_N = 40  # the recipes' default solver_steps


def _with_usual(k: int) -> str:
    return ", ".join(str(j) for j in sorted({*USUAL_K, k}))


def holding_grid(k: int, grid: SolverGrid) -> int | None:
    """The smallest solver grid size from 40 on (hypersd's default; below it, the largest) whose
    points hold the boundaries of k segments and of 1, 2, 4 and 8 on the grid's T and spacing
    (None: there is none)."""
    ks = {*USUAL_K, k}
    if grid.spacing == "trailing":
        fits = [n for n in range(1, grid.T + 1) if grid.T % n == 0 and all(n % j == 0 and grid.T % j == 0 for j in ks)]
    else:
        fits = [n for n in range(2, grid.T + 1) if (grid.T - 1) % (n - 1) == 0
                and all((n - 1) % (j - 1) == 0 and (grid.T - 1) % (j - 1) == 0 for j in ks if j > 1)]
    return min(fits, key=lambda n: (n < DEFAULT_N, abs(n - DEFAULT_N))) if fits else None


def _largest_below(ascending: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """For each t, the largest entry of ``ascending`` strictly below it (the first entry at least)."""
    i = torch.searchsorted(ascending, t.to(ascending.device), right=False) - 1
    return ascending[i.clamp(min=0)].to(t.device)
