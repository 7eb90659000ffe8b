"""The recipe: stages, their weights and schedules, as data (YAML), resolved and validated once.

A stage's missing fields come from the recipe's ``stage_defaults``, then from ``Stage``'s own
defaults. Unknown keys are refused by name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import HypersdError

CONFIGS = Path(__file__).parent / "configs"
STAGE_KINDS = ("tscd",)


@dataclass
class Stage:
    name: str
    kind: str = "tscd"
    segments: int = 8  # k
    end: str = "segment"  # t_end: "segment" (anywhere in [t_b, t_{n-1}]) or "boundary"
    boundary_prob: float = 0.0  # with end "segment": share of t_end draws put on t_b itself
    steps: int = 500
    batch: int = 64
    lr: float = 5e-4
    ema_decay: float = 0.95
    guidance: list[float] | None = None  # [ω_min, ω_max]; None: the teacher's default ± 25%
    distance: str = "mse"  # or "huber"
    huber_c: float = 0.03
    offset_noise: float = 0.0
    solver_steps: int = 40  # N of the teacher's trailing grid
    mse_weight: float = 1.0
    adv_weight: float = 0.0
    d_lr: float = 2e-4
    d_hidden: int = 64


@dataclass
class Recipe:
    stages: list[Stage]
    backbone: str = "digits"
    teacher: str | None = None
    seed: int = 0
    lora_rank: int = 32
    lora_alpha: float | None = None
    lora_targets: str | list[str] = "all"
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    checkpoint_keep: int = 2
    eval_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    eval_etas: list[float] = field(default_factory=lambda: [0.0])
    eval_n: int = 1000
    eval_seeds: int = 3
    grid_every_stage: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed (evaluation settings excluded)."""
        d = self.to_dict()
        for k in ("eval_steps", "eval_etas", "eval_n", "eval_seeds", "checkpoint_every", "checkpoint_keep"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_keys(d: dict, cls, where: str, extra=()) -> None:
    unknown = sorted(set(d) - set(_fields(cls)) - set(extra))
    if unknown:
        raise HypersdError(f"unknown key(s) {unknown} in {where}; known keys: {', '.join(sorted(_fields(cls)))}")


def from_dict(raw: dict, source: str = "config") -> Recipe:
    if not isinstance(raw, dict):
        raise HypersdError(f"{source} must be a YAML mapping of recipe keys")
    raw = dict(raw)
    _check_keys(raw, Recipe, source, extra=("stage_defaults",))
    defaults = raw.pop("stage_defaults", None) or {}
    _check_keys(defaults, Stage, f"{source}: stage_defaults")
    stages_raw = raw.pop("stages", None)
    if not stages_raw:
        raise HypersdError(f"{source} has no stages; list at least one under 'stages:'")
    stages = []
    for i, s in enumerate(stages_raw):
        if not isinstance(s, dict) or "name" not in s:
            raise HypersdError(f"{source}: stage {i + 1} needs a 'name'")
        _check_keys(s, Stage, f"{source}: stage {s['name']!r}")
        stage = Stage(**{**defaults, **s})
        _validate_stage(stage, source)
        stages.append(stage)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise HypersdError(f"{source}: stage names must be unique, got {names}")
    return Recipe(stages=stages, **raw)


def _validate_stage(s: Stage, source: str) -> None:
    where = f"{source}: stage {s.name!r}"
    if s.kind not in STAGE_KINDS:
        raise HypersdError(f"{where}: unknown stage kind {s.kind!r}; known kinds: {', '.join(STAGE_KINDS)}")
    if s.end not in ("segment", "boundary"):
        raise HypersdError(f"{where}: end must be 'segment' or 'boundary', got {s.end!r}")
    if s.distance not in ("mse", "huber"):
        raise HypersdError(f"{where}: distance must be 'mse' or 'huber', got {s.distance!r}")
    if s.steps < 1 or s.batch < 1:
        raise HypersdError(f"{where}: steps and batch must be positive")
    if s.guidance is not None and (len(s.guidance) != 2 or s.guidance[0] > s.guidance[1]):
        raise HypersdError(f"{where}: guidance must be [min, max] with min <= max, got {s.guidance}")
    if not 0 <= s.boundary_prob <= 1:
        raise HypersdError(f"{where}: boundary_prob must be in [0, 1], got {s.boundary_prob}")
    if not 0 <= s.ema_decay < 1:
        raise HypersdError(f"{where}: ema_decay must be in [0, 1), got {s.ema_decay}")


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML (a path, or a name of a packaged config such as 'digits')."""
    path = resolve_path(path or "digits")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HypersdError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise HypersdError(f"--set takes key=value, got {item!r}")
        raw[key.strip()] = yaml.safe_load(value)
    return from_dict(raw, str(path))


def resolve_path(name: str | Path) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    packaged = CONFIGS / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(q.stem for q in CONFIGS.glob("*.yaml")))
    raise HypersdError(f"config {name} not found: pass a YAML file or one of the packaged recipes ({known})")
