"""A stage's learning rate at each step: constant, or a cosine from ``lr`` down to ``lr_end``.

A function of the step alone, so a resumed stage sets the rate the uninterrupted one had with
nothing to checkpoint. A decay settles the weights over a stage's last steps, where a constant
rate still moves them by the optimizer's full step (measured on digits: docs/RESULTS.md, off in
every packaged recipe).
"""

from __future__ import annotations

import math

from hypersd.train.recipe import Stage


def stage_lr(stage: Stage, step: int) -> float:
    """The rate for the stage's step ``step`` (0-based): ``lr`` at 0, ``lr_end`` at ``steps − 1``."""
    if stage.lr_end is None or stage.steps <= 1:
        return stage.lr
    frac = min(max(step, 0), stage.steps - 1) / (stage.steps - 1)
    return stage.lr_end + 0.5 * (stage.lr - stage.lr_end) * (1 + math.cos(math.pi * frac))


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
