"""Trajectory Segmented Consistency Distillation: one training step's loss (HYPERSD.md §1).

The same step gives the baselines by its options: LCM-style is one segment with the target at
the segment boundary (always the clean end); phased consistency is k segments with the target at
the boundary; TSCD draws the target anywhere in [t_b, t_{n-1}].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hypersd.core.schedule import CLEAN, Segments
from hypersd.nets.roles import Roles
from hypersd.teachers.base import Cond, Teacher


@dataclass
class ConsistencyConfig:
    segments: int = 8
    end: str = "segment"  # "segment": t_end ~ U[t_b, t_{n-1}]; "boundary": t_end = t_b
    boundary_prob: float = 0.0  # with "segment": this share of draws goes to t_b itself
    # ω ~ U[min, max] for the teacher step; None: the conditional teacher alone, one pass with no
    # unconditional rows (a CFG-preserving LoRA's target, PCM's --not_apply_cfg_solver)
    guidance: tuple[float, float] | None = (1.0, 1.0)
    distance: str = "mse"  # or "huber" (pseudo-Huber), or "l1" (mean absolute error per element)
    huber_c: float = 0.03
    offset_noise: float = 0.0
    solver_steps: int = 40  # N, the teacher's trailing DDIM grid
    # t_n at or below it: the target is the teacher's own DDIM on the grid from t_n down to t_end,
    # with no EMA jump, so the student's low-noise x0 does not inherit its target's errors (CLEAN: off)
    solve_below: int = CLEAN
    # grid points per teacher call in that solve (a large stride: one jump from t_{n-1} to t_end)
    solve_stride: int = 1


def distance(pred: torch.Tensor, tgt: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Per-sample distance: mean squared error, pseudo-Huber √(‖·‖²+c²) − c, or mean absolute error
    (which, unlike the two, pulls as hard on an element's small error as on a large one)."""
    if kind == "l1":
        return (pred - tgt).abs().flatten(1).mean(1)
    sq = (pred - tgt).pow(2).flatten(1).mean(1)
    if kind == "mse":
        return sq
    if kind == "huber":
        return (sq + c**2).sqrt() - c
    raise ValueError(f"unknown distance {kind!r}")


def draw_t_end(t_b: torch.Tensor, t_prev: torch.Tensor, end: str, generator=None,
               boundary_prob: float = 0.0) -> torch.Tensor:
    """The target timestep inside the segment; CLEAN (−1) is an integer, so U[t_b, t_{n-1}] is one draw.

    ``boundary_prob`` sends that share of draws to t_b itself: the jump a k-step sampler makes.
    """
    if end == "boundary":
        return t_b
    if end == "segment":
        u = torch.rand(t_b.shape, generator=generator)
        t_end = t_b + (u * (t_prev - t_b + 1)).floor().long()
        if boundary_prob > 0:
            to_b = torch.rand(t_b.shape, generator=generator) < boundary_prob
            t_end = torch.where(to_b, t_b, t_end)
        return t_end
    raise ValueError(f"unknown end {end!r}; use 'segment' or 'boundary'")


class ConsistencyStep:
    """Produces (pred, tgt, t_end) for a batch; the trainer adds distance and adversarial terms."""

    def __init__(self, teacher: Teacher, cfg: ConsistencyConfig, roles: Roles | None = None,
                 lockstep: Callable[[int], int] | None = None):
        """``lockstep``: every process must make the same network calls (a sharded base all-gathers
        in each), whatever its own draws; it maps this process's count of low-noise solve calls to
        the largest count of any process (``Runtime.most``). The EMA then runs on every row, as each
        process's rows differ in which are already at t_end, and the solve pads its calls to that
        count."""
        self.teacher, self.cfg, self.lockstep = teacher, cfg, lockstep
        self.roles = Roles(teacher) if roles is None else roles
        self.schedule = teacher.schedule
        self.grid = self.schedule.solver_grid(cfg.solver_steps)
        self.segments = Segments(cfg.segments, self.grid)  # refuses boundaries off the grid

    def __call__(self, z: torch.Tensor, cond: Cond, uncond: Cond, generator=None):
        roles, cfg, sched = self.roles, self.cfg, self.schedule
        n, dev = z.shape[0], z.device
        t_n = self.grid.sample(n, generator)
        t_prev = self.grid.step_down(t_n)
        t_end = draw_t_end(self.segments.lower_boundary(t_n), t_prev, cfg.end, generator, cfg.boundary_prob)
        t_n, t_prev, t_end = t_n.to(dev), t_prev.to(dev), t_end.to(dev)
        noise = torch.randn(z.shape, generator=generator).to(dev)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn((n, z.shape[1], 1, 1), generator=generator).to(dev)
        x_t = sched.add_noise(z, noise, t_n)
        with torch.no_grad():
            w = self._guidance(n, generator, dev)
            x_hat = sched.jump(x_t, self._teacher(x_t, t_n, cond, uncond, w), t_n, t_prev)
            # Already at t_end (or at the clean end) there is nothing left to jump.
            done = (t_prev == t_end) | (t_prev == CLEAN)
            low = ~done & (t_n <= cfg.solve_below)
            tgt = x_hat.clone()
            # the EMA runs only on the rows it targets (in lockstep on all, the same call everywhere)
            ema = torch.arange(n, device=dev) if self.lockstep else (~done & ~low).nonzero().squeeze(1)
            if len(ema):
                eps_ema = roles.ema(x_hat[ema], t_prev[ema].clamp(min=0), cond[ema])
                tgt[ema] = sched.jump(x_hat[ema], eps_ema, t_prev[ema], t_end[ema])
                tgt[done] = x_hat[done]
            low = low.nonzero().squeeze(1)
            if len(low) or self.lockstep:
                calls, idle = self.solve_calls(t_prev[low], t_end[low]), None
                if self.lockstep:
                    calls = self.lockstep(calls)
                    # a padding call's input: any row, at a timestep the network takes; its output is dropped
                    idle = (x_hat[:1], t_n[:1], cond[:1], uncond[:1], None if w is None else w[:1])
                tgt[low] = self._solve(x_hat[low], t_prev[low], t_end[low], cond[low], uncond[low],
                                       None if w is None else w[low], calls, idle)

        pred = sched.jump(x_t, roles.student(x_t, t_n, cond), t_n, t_end)
        return pred, tgt, t_end

    def _guidance(self, n: int, generator, dev) -> torch.Tensor | None:
        """ω per row for the teacher's steps; None: the conditional teacher alone."""
        if self.cfg.guidance is None:
            return None
        return torch.empty(n).uniform_(*self.cfg.guidance, generator=generator).to(dev)

    def _teacher(self, x_t, t_n, cond: Cond, uncond: Cond, w) -> torch.Tensor:
        if w is None:
            return self.roles.teacher(x_t, t_n, cond)
        return self.roles.teacher.cfg(x_t, t_n, cond, uncond, w)

    def _next(self, t: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """Where one solve call takes rows at t: ``solve_stride`` grid points down, not past t_end."""
        nxt = t.cpu()
        for _ in range(self.cfg.solve_stride):
            nxt = self.grid.step_down(nxt)
        return torch.maximum(nxt.to(t.device), t_end)

    def solve_calls(self, t: torch.Tensor, t_end: torch.Tensor) -> int:
        """The teacher calls ``_solve`` makes for rows at t going to t_end (the most any row needs)."""
        calls = 0
        while bool((t > t_end).any()):
            rows = t > t_end
            t = torch.where(rows, self._next(torch.where(rows, t, t_end.clamp(min=0)), t_end), t)
            calls += 1
        return calls

    def _solve(self, x, t, t_end, cond: Cond, uncond: Cond, w, calls: int, idle: tuple | None = None) -> torch.Tensor:
        """The teacher's DDIM on the solver grid from (x, t) to t_end, ``solve_stride`` grid points
        a call, each row to its own t_end, each row at its own ω, in ``calls`` teacher calls
        (``solve_calls``; in lockstep the most any process makes, those past the rows' own made on
        ``idle`` and dropped)."""
        for _ in range(calls):
            rows = (t > t_end).nonzero().squeeze(1)
            if not len(rows):
                self._teacher(*idle)  # another process still solves: its all-gathers need this one's
                continue
            nxt = self._next(t[rows], t_end[rows])
            out = self._teacher(x[rows], t[rows], cond[rows], uncond[rows], None if w is None else w[rows])
            x, t = x.clone(), t.clone()
            x[rows], t[rows] = self.schedule.jump(x[rows], out, t[rows], nxt), nxt
        return x

    def loss(self, pred, tgt) -> torch.Tensor:
        return distance(pred, tgt.detach(), self.cfg.distance, self.cfg.huber_c).mean()
