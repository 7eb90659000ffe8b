"""What a stage may use of the run it belongs to, and nothing more.

A stage gets a ``StageContext`` instead of the trainer: its networks (``roles``), the teacher's
schedule and codec, the run's generator and unconditional row, the runtime that steps every
optimizer, and the few recipe settings stages read. What a stage cannot reach it cannot come to
depend on, so a stage runs the same under the trainer, a test or another loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hypersd.core.noise import NoiseSchedule
from hypersd.errors import HypersdError
from hypersd.nets.roles import Roles
from hypersd.teachers.base import Cond, Teacher
from hypersd.train.runtime import Runtime


def _no_batches(n: int, generator=None):
    raise RuntimeError("this stage context has no data: give StageContext a batch function")


@dataclass
class StageContext:
    teacher: Teacher
    generator: torch.Generator  # the run's data and noise stream (checkpointed by the trainer)
    uncond_row: Cond  # the empty prompt's conditioning, one row
    rt: Runtime = field(default_factory=Runtime)
    roles: Roles | None = None  # built from the teacher when not given
    schedule: NoiseSchedule | None = None  # the teacher's, kept once (its tables are per object)
    # (n, generator=None) -> (latents, prompts, cond); the run's generator by default
    batch: Callable = _no_batches
    lora_meta: Callable[..., dict] = lambda stage: {}
    out: Path | None = None  # the run's output folder
    progress: bool = False
    seed: int = 0  # the recipe's
    stages: list = field(default_factory=list)  # the recipe's stages, in order (a stage's own seed)
    lora_rank: int = 32  # the recipe defaults
    lora_alpha: float | None = None
    grad_clip: float | None = 1.0
    # the recipe's cfg: "bake", or "preserve" with the share of prompts dropped and the guidance the
    # student is sampled at (``preserved_cfg``)
    cfg: str = "bake"
    cfg_dropout: float = 0.0
    cfg_guidance: float | None = None
    # the draws that decide a step's network calls (a sampler's step count, a branch), the same on
    # every process (``runtime.run_streams``); None: ``generator``'s, as one process draws them
    control: torch.Generator | None = None

    def __post_init__(self):
        self.control = self.generator if self.control is None else self.control
        self.roles = Roles(self.teacher) if self.roles is None else self.roles
        self.schedule = self.teacher.schedule if self.schedule is None else self.schedule

    def stage_seed(self, stage, salt: int) -> int:
        """A seed of the stage's own, from the recipe's: the same stage draws the same on a resume."""
        return self.seed + salt * (1 + self.stages.index(stage))

    @classmethod
    def of(cls, source) -> StageContext:
        """A context from a StageContext, or from anything that makes one (``stage_context()``),
        or that holds the same names (a test's namespace: teacher, generator, uncond_row, rt and,
        where it has one, recipe)."""
        if isinstance(source, cls):
            return source
        if hasattr(source, "stage_context"):
            return source.stage_context()
        recipe = getattr(source, "recipe", None)
        keys = ("seed", "stages", "lora_rank", "lora_alpha", "grad_clip")
        settings = {} if recipe is None else {k: getattr(recipe, k) for k in keys if hasattr(recipe, k)}
        settings |= {k: getattr(source, k) for k in ("batch", "lora_meta", "out", "progress") if hasattr(source, k)}
        if recipe is not None:
            settings |= preserved_cfg(recipe, source.teacher)
        return cls(source.teacher, source.generator, source.uncond_row, getattr(source, "rt", None) or Runtime(),
                   **settings)


def preserved_cfg(recipe, teacher: Teacher) -> dict:
    """The context's cfg settings for a recipe: under ``cfg: preserve`` its dropout and its guidance
    (the teacher's default where unset); under ``bake`` none (no prompt is dropped, and the student
    is sampled as its backbone says)."""
    if getattr(recipe, "cfg", "bake") != "preserve":
        return {}
    w = recipe.cfg_guidance if recipe.cfg_guidance is not None else teacher.default_guidance
    if w <= 1:
        raise HypersdError(f"cfg: preserve needs a guidance above 1 to sample the LoRA at, and the teacher's default "
                           f"is {w:g}; set cfg_guidance")
    return {"cfg": "preserve", "cfg_dropout": recipe.cfg_dropout, "cfg_guidance": float(w)}
