"""The recipe: stages, their weights and schedules, as data (YAML), resolved and validated once.

A stage's missing fields come from the recipe's ``stage_defaults``, then from ``Stage``'s own
defaults. Unknown keys are refused by name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hypersd.errors import HypersdError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # hypersd/configs


@dataclass
class Stage:
    """What every stage has. A stage's ``kind`` picks its dataclass below (``STAGE_KINDS``)."""

    name: str
    kind: str = "tscd"
    steps: int = 500
    batch: int = 64
    lr: float = 5e-4
    # None: lr throughout; a value: cosine from lr at the first step to lr_end at the last
    # (train/lr_schedule.py; the stage's own optimizer only, not a fake score's or a discriminator's)
    lr_end: float | None = None
    # [β1, β2] of the stage's own AdamW; None: torch's (0.9, 0.999). β1 0 (no momentum) is what
    # adversarial and DMD-style trainers use where two networks chase each other.
    betas: list[float] | None = None


@dataclass
class TSCDStage(Stage):
    """HYPERSD.md §1: consistency distillation over k trajectory segments."""

    segments: int = 8  # k
    end: str = "segment"  # t_end: "segment" (anywhere in [t_b, t_{n-1}]) or "boundary"
    boundary_prob: float = 0.0  # with end "segment": share of t_end draws put on t_b itself
    ema_decay: float = 0.95
    guidance: list[float] | None = None  # [ω_min, ω_max]; None: the teacher's default ± 25%
    distance: str = "mse"  # or "huber", or "l1"
    huber_c: float = 0.03
    offset_noise: float = 0.0
    solver_steps: int = 40  # N of the teacher's trailing grid
    mse_weight: float = 1.0
    adv_weight: float = 0.0
    d_lr: float = 2e-4
    d_hidden: int = 64
    # the discriminator's real sample: "target" (the paper's: the EMA target at t_end) or "data"
    # (the batch's clean latents noised to t_end; hypersd's extension, see docs/METHOD.md)
    adv_real: str = "target"
    # t_n at or below it: the teacher's own DDIM from t_n to t_end is the target, not an EMA jump
    # (losses/tscd.py; -1: never, the paper's target everywhere)
    solve_below: int = -1
    # solver-grid points per teacher call in that solve (1: every point; a large one: one jump)
    solve_stride: int = 1


@dataclass
class FeedbackStage(Stage):
    """HYPERSD.md §2: a separate LoRA on the (frozen) distilled one, trained on rewards."""

    # [{name, weight, alpha, path?, options?}]: loss Σ weight·ReLU(alpha − reward)
    rewards: list[dict] = field(default_factory=list)
    sample_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # the student's k
    t_range: list[int] = field(default_factory=lambda: [0, 999])  # where the sampler may stop
    perceptual_weight: float = 0.0
    perceptual_model: str = "digits"  # feature extractor for the perceptual loss
    perceptual_t: list[int] = field(default_factory=lambda: [0, 999])  # t_a of the real image
    rank: int | None = None  # the feedback LoRA's rank; None: the recipe's lora_rank


@dataclass
class MergeStage(Stage):
    """Distilled LoRA + ratio x feedback LoRA, exactly (ranks add), into one student LoRA."""

    steps: int = 0
    ratio: float = 1.0
    # None: the exact merge, of rank r_student + r_feedback. A rank: the merge's truncated SVD per
    # layer at that rank (lora.compress_state), so the stages after it pay for that rank only.
    rank: int | None = None


@dataclass
class DMDStage(Stage):
    """HYPERSD.md §3: one-step score distillation with a LoRA fake score."""

    generator_t: int = 999  # 999: the unified LoRA's first step; 800: a dedicated 1-step model
    t_range: list[int] = field(default_factory=lambda: [20, 980])  # where the scores are compared
    guidance: float | None = None  # the real score's CFG; None: the teacher's default
    fake_rank: int | None = None  # None: the recipe's lora_rank
    fake_lr: float = 1e-3
    fake_updates: int = 4  # fake-score updates per generator update
    fake_warmup: int = 50  # fake-score updates before the generator's first
    fake_betas: list[float] | None = None  # the fake score's AdamW [β1, β2]; None: (0.9, 0.999)
    dmd_weight: float = 1.0
    reg_weight: float = 0.25  # reg_distance to the teacher's ODE output from the same noise
    # "l1": the mean absolute error instead; its minimiser is the pixel's median, not its mean, so
    # a target the one-step map cannot reach pointwise is not averaged into grey
    reg_distance: str = "mse"
    reg_steps: int = 20  # teacher DDIM steps for that output
    reg_pool: int = 256  # noise/output pairs computed once per stage
    reg_batch: int = 16
    # The generator is one LoRA for every step count: keep its ε at the other samplers' timesteps
    # (those of keep_steps, all but generator_t) close to where this stage found it.
    keep_weight: float = 0.0
    keep_steps: list[int] = field(default_factory=lambda: [2, 4, 8])
    keep_batch: int = 16
    rewards: list[dict] = field(default_factory=list)  # optional feedback terms on the generator
    # The generator's one-step samples swing with the fake score from step to step; > 0: the stage
    # hands on an EMA of the generator (this decay per step) instead of its last state.
    generator_ema: float = 0.0
    # Multi-step DMD (DMD2's backward simulation): each generator step draws k of these (a repeated
    # entry is drawn more often) and a step i of the student's k-step sampler, runs that sampler (at
    # generator_eta) from noise without gradient to its i-th timestep, and trains the student's step
    # there. k = 1 is the one-step generator at generator_t; [1] trains only that one (the stage as
    # before the option).
    generator_steps: list[int] = field(default_factory=lambda: [1])
    generator_eta: float = 0.0  # the sampler's eta (TCD gamma) on the way to step i
    # DMD2's GAN term (docs/METHOD.md): heads on the fake score's first half (its adapter on) classify
    # the batch's latents (real) against the generator's samples, both noised to a t of gan_t_range.
    # gan_weight > 0: the generator's loss adds gan_weight·softplus(−D(x)) (DMD2: 3e-3 on ImageNet,
    # 5e-3 on SDXL, with a DMD loss normalised as here); each fake update adds gan_d_weight times the
    # classifier's loss (DMD2: 1e-2), which trains the heads and, with gan_train_fake, the fake LoRA.
    gan_weight: float = 0.0
    gan_d_weight: float = 1e-2
    gan_hidden: int = 64  # the heads' width
    gan_t_range: list[int] = field(default_factory=lambda: [20, 980])
    gan_train_fake: bool = True
    # Regularisation by denoising (losses/dmd.py red_loss): red_weight > 0 pulls each generator sample
    # towards the real score's x0 of it noised to a t of red_t_range, in the real score's call
    # (docs/METHOD.md). The fake score cannot see a speck under DMD's noise; the real score at low
    # noise removes it.
    red_weight: float = 0.0
    red_t_range: list[int] = field(default_factory=lambda: [2, 10])  # measured: a better trade than [10, 50]


STAGE_KINDS = {"tscd": TSCDStage, "feedback": FeedbackStage, "merge": MergeStage, "dmd": DMDStage}


@dataclass
class RunSettings:
    """How the steps run, not what they compute: a run may resume with other settings (docs/SPEED.md)."""

    device: str = "auto"  # auto (cuda when there is one), cpu, cuda, cuda:N; accelerate launch sets its own
    mixed_precision: str = "no"  # no, bf16, fp16: the frozen weights and autocast; LoRA weights stay float32
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the UNet's repeated blocks
    tf32: bool = True
    optimizer: str = "adamw"  # or adamw8bit (bitsandbytes)
    fp8_teacher: bool = False  # the teacher passes' frozen linear layers in FP8 (compute capability 8.9+)
    # the frozen base's linear weights stored quantized under the float32 LoRA (docs/MEMORY.md):
    # none, int8 or fp8 (torchao, weight-only), nf4 (bitsandbytes, 4-bit)
    quantize_base: str = "none"
    quantize_text_encoders: bool = False  # the same for the teacher's text encoders (T5: 4.8 B weights)
    shard_base: bool = False  # the frozen base sharded over the processes with FSDP2, the LoRA whole (nets/shard.py)
    checkpoint_every: int = 200
    checkpoint_keep: int = 2
    # an optimizer's non-finite steps are skipped; this many in a row (of one optimizer) stop the run
    max_bad_steps: int = 20


@dataclass
class EvalSettings:
    """What a run measures and shows of its LoRAs: sample grids and, on digits, the judges' tables."""

    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    etas: list[float] = field(default_factory=lambda: [0.0])  # of which each step count's recommended eta is picked
    n: int = 1000
    seeds: int = 3
    grid_every_stage: bool = True


SECTIONS = {"run": RunSettings, "eval": EvalSettings}
# A recipe's flat keys (every recipe before the sections, and any still) and where each now lives.
FLAT = {**{f.name: ("run", f.name) for f in dataclasses.fields(RunSettings)},
        **{f"eval_{f.name}": ("eval", f.name) for f in dataclasses.fields(EvalSettings) if f.name != "grid_every_stage"},
        "grid_every_stage": ("eval", "grid_every_stage")}


@dataclass
class Recipe:
    """The method (what the fingerprint covers), then ``run`` (how it runs) and ``eval`` (what it
    measures). A flat name such as ``recipe.eval_steps`` reads its section's field."""

    stages: list[Stage]
    backbone: str = "digits"
    teacher: str | None = None
    # a single-file teacher's diffusers folder (or cached hub id): the configs, text encoders and
    # tokenizers the checkpoint lacks; offline, diffusers cannot fetch them itself
    teacher_config: str | None = None
    data: str | None = None  # sd15/sdxl: the folder written by hypersd cache (docs/DATA.md)
    resolution: int | None = None  # sd15/sdxl: the training resolution the cache must have been made at
    vae: str | None = None  # sd15/sdxl: a VAE in place of the model's own (e.g. SDXL's fp16-safe one)
    init_lora: str | None = None  # a distilled LoRA the first stage starts from
    seed: int = 0
    lora_rank: int = 32
    lora_alpha: float | None = None
    lora_targets: str | list[str] = "all"
    grad_clip: float = 1.0
    # "bake": the teacher's CFG is distilled into the student, sampled at guidance 1 (the paper's N-step
    # and unified LoRAs). "preserve": a LoRA sampled WITH classifier-free guidance at cfg_guidance, its
    # negative prompt working (the published CFG LoRAs): a conditional teacher step and prompt dropout
    # (docs/METHOD.md, "CFG-preserving LoRAs").
    cfg: str = "bake"
    cfg_dropout: float = 0.1  # preserve: the share of training prompts replaced by the empty prompt
    cfg_guidance: float | None = None  # preserve: the guidance it is trained for and sampled at; None: the teacher's
    run: RunSettings = field(default_factory=RunSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __getattr__(self, name):  # only for names that are no attribute: the flat ones
        if name in FLAT and FLAT[name][0] in self.__dict__:
            section, key = FLAT[name]
            return getattr(self.__dict__[section], key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in FLAT:
            section, key = FLAT[name]
            setattr(getattr(self, section), key, value)
        else:
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: the method, not its run or eval sections."""
        d = self.to_dict()
        del d["run"], d["eval"]
        # Before the sections, grid_every_stage counted, at its default true in nearly every run:
        # hashed as that constant, those runs' checkpoints keep their fingerprints and resume.
        d["grid_every_stage"] = True
        for k in ("data", "resolution", "vae", "teacher_config"):  # unset, they leave the fingerprints of earlier runs as they were
            if d[k] is None:
                d.pop(k)
        if d["cfg"] == "bake":  # so do baked CFG (every run before the option) and the settings it ignores
            for k in ("cfg", "cfg_dropout", "cfg_guidance"):
                d.pop(k)
        for s in d["stages"]:  # likewise a constant lr, a merge's unset rank and DMD without a generator average
            if s.get("lr_end", 0) is None:
                s.pop("lr_end")
            for k in ("betas", "fake_betas"):  # and torch's AdamW betas
                if k in s and s[k] is None:
                    s.pop(k)
            if s["kind"] == "merge" and s.get("rank", 0) is None:
                s.pop("rank")
            if s["kind"] == "dmd" and s.get("generator_ema") == 0:
                s.pop("generator_ema")
            if s["kind"] == "dmd" and s.get("generator_steps") == [1]:  # and one-step DMD
                s.pop("generator_steps")
                s.pop("generator_eta")
            if s["kind"] == "dmd" and s.get("gan_weight") == 0:  # and DMD without the GAN term
                for k in ("gan_weight", "gan_d_weight", "gan_hidden", "gan_t_range", "gan_train_fake"):
                    s.pop(k)
            if s["kind"] == "dmd" and s.get("reg_distance") == "mse":  # and the regulariser's MSE
                s.pop("reg_distance")
            if s["kind"] == "dmd" and s.get("red_weight") == 0:  # and DMD without regularisation by denoising
                s.pop("red_weight")
                s.pop("red_t_range")
            if s["kind"] == "tscd" and s.get("adv_real") == "target":  # and TSCD's paper discriminator
                s.pop("adv_real")
            if s["kind"] == "tscd" and s.get("solve_below") == -1:  # and its EMA targets everywhere
                s.pop("solve_below")
            if s["kind"] == "tscd" and s.get("solve_stride") == 1:  # and the solve on every point
                s.pop("solve_stride")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_keys(d: dict, known: set, where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise HypersdError(f"unknown key(s) {unknown} in {where}; known keys: {', '.join(sorted(known))}")


def from_dict(raw: dict, source: str = "config") -> Recipe:
    if not isinstance(raw, dict):
        raise HypersdError(f"{source} must be a YAML mapping of recipe keys")
    raw = dict(raw)
    _check_keys(raw, set(_fields(Recipe)) | set(FLAT) | {"stage_defaults"}, source)
    sections = _sections(raw, source)
    defaults = raw.pop("stage_defaults", None) or {}
    # a default may serve any kind; each stage takes the defaults its own kind knows
    _check_keys(defaults, set().union(*(_fields(c) for c in STAGE_KINDS.values())), f"{source}: stage_defaults")
    stages_raw = raw.pop("stages", None)
    if not stages_raw:
        raise HypersdError(f"{source} has no stages; list at least one under 'stages:'")
    stages = []
    for i, s in enumerate(stages_raw):
        if not isinstance(s, dict) or "name" not in s:
            raise HypersdError(f"{source}: stage {i + 1} needs a 'name'")
        where = f"{source}: stage {s['name']!r}"
        kind = s.get("kind", "tscd")
        if kind not in STAGE_KINDS:
            raise HypersdError(f"{where}: unknown stage kind {kind!r}; known kinds: {', '.join(STAGE_KINDS)}")
        cls = STAGE_KINDS[kind]
        _check_keys(s, set(_fields(cls)), f"{where} (kind {kind})")
        known = _fields(cls) if cls is not MergeStage else {}  # a merge does not train: no defaults
        used = {k: v for k, v in defaults.items() if k in known and k != "kind"}
        hints = _hints(cls)
        stage = cls(**{**_typed(used, hints, f"{source}: stage_defaults (for stage {s['name']!r})"),
                       **_typed(s, hints, where)})
        _validate_stage(stage, where)
        stages.append(stage)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise HypersdError(f"{source}: stage names must be unique, got {names}")
    recipe = Recipe(stages=stages, **_typed(raw, _hints(Recipe), source), **sections)
    _validate_order(recipe, source)
    _validate_runtime(recipe, source)
    _validate_settings(recipe, source)
    check_timesteps(recipe, source)
    return recipe


def _sections(raw: dict, source: str) -> dict:
    """The ``run`` and ``eval`` sections, popped from ``raw``: each from its mapping and from the
    flat keys that map to it (``eval_steps`` is ``eval: {steps}``), typed as written."""
    given = {name: raw.pop(name, None) or {} for name in SECTIONS}
    for name, values in given.items():
        if not isinstance(values, dict):
            raise HypersdError(f"{source}: {name} must be a mapping of {name} settings, got {values!r}")
        _check_keys(values, set(_fields(SECTIONS[name])), f"{source}: {name}")
    out = {name: _typed(values, _hints(SECTIONS[name]), f"{source}: {name}") for name, values in given.items()}
    for flat in [k for k in raw if k in FLAT]:
        name, key = FLAT[flat]
        if key in given[name]:
            raise HypersdError(f"{source}: {flat} and {name}.{key} are the same setting; keep one of them")
        out[name] |= {key: _typed({flat: raw.pop(flat)}, {flat: _hints(SECTIONS[name])[key]}, source)[flat]}
    return {name: SECTIONS[name](**values) for name, values in out.items()}


# YAML reads a float only with a dot and a signed exponent: 1e-4 and 1.0e30 arrive as strings.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NAMES = {int: "a whole number (int)", float: "a number (float)", str: "a string (str)", bool: "true or false",
          dict: "a mapping (dict)", type(None): "null"}
_PLURALS = {int: "whole numbers", float: "numbers", str: "strings", bool: "trues or falses", dict: "mappings"}
REWARD_HINTS = {"name": str, "weight": float, "alpha": float | None, "path": str | None, "options": dict | None}


class _WrongType(Exception):
    pass


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # the annotations are strings (postponed evaluation)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_PLURALS.get(item, item.__name__)} (list[{item.__name__}])"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _conform(value, hint):
    """``value`` as type ``hint``, or _WrongType. A number YAML left as a string becomes its float;
    nothing else is converted (an int field never takes 2.5, a bool field never takes 1)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _conform(value, option)
            except _WrongType:
                pass
        raise _WrongType
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        (item,) = typing.get_args(hint)
        return [_conform(v, item) for v in value]
    if hint is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if hint in (int, float):  # a bool is an int to Python, never a number to a recipe; ints stay ints
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    elif hint in _NAMES:
        ok = isinstance(value, hint)
    else:  # a nested recipe type (the stages): checked where it is built
        return value
    if not ok:
        raise _WrongType
    return value


def _typed(d: dict, hints: dict, where: str) -> dict:
    """``d`` with each value checked against its field's declared type (see ``_conform``)."""
    out = {}
    for key, value in d.items():
        try:
            out[key] = _conform(value, hints[key]) if key in hints else value
        except _WrongType:
            raise HypersdError(f"{where}: {key} must be {_describe(hints[key])}, got {value!r}") from None
    return out


def _validate_runtime(recipe: Recipe, source: str) -> None:
    from hypersd.backbones import get_backbone
    from hypersd.nets.quant import KINDS

    choices = {"mixed_precision": ("no", "bf16", "fp16"), "optimizer": ("adamw", "adamw8bit"), "quantize_base": KINDS}
    for key, allowed in choices.items():
        if getattr(recipe.run, key) not in allowed:
            raise HypersdError(f"{source}: {key} {getattr(recipe.run, key)!r} is not one of {', '.join(allowed)}")
    switches = [f.name for f in dataclasses.fields(RunSettings) if f.type == "bool"]
    for key in switches:
        if not isinstance(getattr(recipe.run, key), bool):  # YAML's "maybe" or 1 would read as on
            raise HypersdError(f"{source}: {key} must be true or false, got {getattr(recipe.run, key)!r}")
    if recipe.run.quantize_base != "none" and recipe.run.fp8_teacher:
        raise HypersdError(f"{source}: fp8_teacher and quantize_base {recipe.run.quantize_base} both change the frozen "
                           f"weights the teacher runs on (an FP8 copy beside them, or the weights themselves "
                           f"quantized); keep one: fp8_teacher: false, or quantize_base: none")
    if recipe.run.quantize_text_encoders and recipe.run.quantize_base == "none":
        raise HypersdError(f"{source}: quantize_text_encoders quantizes them as quantize_base says, which is none; "
                           f"set quantize_base: int8, fp8 or nf4, or quantize_text_encoders: false")
    get_backbone(recipe.backbone).check_recipe(recipe, source)


def _range(value, where: str, what: str, lo, hi=None) -> None:
    """``hi`` None: a timestep range, whose top the teacher's T bounds (``check_timesteps``)."""
    top = float("inf") if hi is None else hi
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and lo <= value[0] <= value[1] <= top):
        bound = "" if hi is None else f" <= {hi}"
        raise HypersdError(f"{where}: {what} must be [min, max] with {lo} <= min <= max{bound}, got {value}")


def _rank(value, where: str, key: str, unset: str) -> None:
    if value is not None and not (isinstance(value, int) and value >= 1):
        raise HypersdError(f"{where}: {key} must be a whole number >= 1 (or left out for {unset}), got {value!r}")


def _learning_rates(s: Stage, where: str) -> None:
    for key in ("lr", "d_lr", "fake_lr"):  # the optimizer refuses a negative one when the stage starts
        if getattr(s, key, 0) < 0:
            raise HypersdError(f"{where}: {key} must be >= 0, got {getattr(s, key)}")
    if s.lr_end is not None and not (isinstance(s.lr_end, (int, float)) and s.lr_end >= 0):
        raise HypersdError(f"{where}: lr_end must be a learning rate >= 0 (or left out for a constant lr), "
                           f"got {s.lr_end!r}")


def _betas(s: Stage, where: str) -> None:
    for key in ("betas", "fake_betas"):
        value = getattr(s, key, None)
        if value is not None and not (len(value) == 2 and all(0 <= b < 1 for b in value)):
            raise HypersdError(f"{where}: {key} must be [beta1, beta2], each in [0, 1) (or left out for "
                               f"AdamW's [0.9, 0.999]), got {value!r}")


def _validate_stage(s: Stage, where: str) -> None:
    if s.steps < (0 if s.kind == "merge" else 1) or s.batch < 1:
        raise HypersdError(f"{where}: steps and batch must be positive")
    _learning_rates(s, where)
    _betas(s, where)
    if isinstance(s, TSCDStage):
        if s.end not in ("segment", "boundary"):
            raise HypersdError(f"{where}: end must be 'segment' or 'boundary', got {s.end!r}")
        if s.distance not in ("mse", "huber", "l1"):
            raise HypersdError(f"{where}: distance must be 'mse', 'huber' or 'l1', got {s.distance!r}")
        if s.guidance is not None:
            _range(s.guidance, where, "guidance", 0.0, float("inf"))
        if not 0 <= s.boundary_prob <= 1:
            raise HypersdError(f"{where}: boundary_prob must be in [0, 1], got {s.boundary_prob}")
        if not 0 <= s.ema_decay < 1:
            raise HypersdError(f"{where}: ema_decay must be in [0, 1), got {s.ema_decay}")
        if s.adv_real not in ("target", "data"):
            raise HypersdError(f"{where}: adv_real must be 'target' or 'data', got {s.adv_real!r}")
        if s.adv_weight > 0 and s.d_hidden < 1:
            raise HypersdError(f"{where}: d_hidden must be >= 1 with adv_weight > 0, got {s.d_hidden}")
        if not isinstance(s.solve_below, int) or s.solve_below < -1:
            raise HypersdError(f"{where}: solve_below must be a timestep (-1: off), got {s.solve_below!r}")
        if not isinstance(s.solve_stride, int) or s.solve_stride < 1:
            raise HypersdError(f"{where}: solve_stride must be an integer >= 1 (grid points a teacher "
                               f"call), got {s.solve_stride!r}")
    if isinstance(s, (FeedbackStage, DMDStage)):
        s.rewards = [_reward(r, where) for r in s.rewards]
    if isinstance(s, FeedbackStage):
        if not s.rewards and s.perceptual_weight <= 0:
            raise HypersdError(f"{where}: a feedback stage needs rewards or a perceptual_weight > 0")
        _range(s.t_range, where, "t_range", 0)  # the top: the teacher's T, in check_timesteps
        _range(s.perceptual_t, where, "perceptual_t", 0)
        if not s.sample_steps or any(k < 1 for k in s.sample_steps):
            raise HypersdError(f"{where}: sample_steps must list step counts >= 1, got {s.sample_steps}")
        _rank(s.rank, where, "rank", "the recipe's lora_rank")
        _perceptual_model(s, where)
    if isinstance(s, MergeStage) and s.steps != 0:
        raise HypersdError(f"{where}: a merge stage does not train; leave out 'steps'")
    if isinstance(s, MergeStage):
        _rank(s.rank, where, "rank", "the exact merge")
    if isinstance(s, DMDStage):
        _range(s.t_range, where, "t_range", 0)
        if not 0 <= s.generator_t:
            raise HypersdError(f"{where}: generator_t must be a timestep >= 0, got {s.generator_t}")
        if s.fake_updates < 1 or s.fake_warmup < 0 or s.reg_pool < 1 or s.reg_batch < 1:
            raise HypersdError(f"{where}: fake_updates, reg_pool and reg_batch must be >= 1, fake_warmup >= 0")
        if s.reg_distance not in ("mse", "l1"):
            raise HypersdError(f"{where}: reg_distance must be 'mse' or 'l1', got {s.reg_distance!r}")
        if not 0 <= s.generator_ema < 1:
            raise HypersdError(f"{where}: generator_ema must be in [0, 1) (0: no average), got {s.generator_ema}")
        _rank(s.fake_rank, where, "fake_rank", "the recipe's lora_rank")
        if s.keep_weight > 0 and s.keep_batch < 1:
            raise HypersdError(f"{where}: keep_batch must be >= 1 with keep_weight > 0, got {s.keep_batch}")
        if not s.generator_steps or any(k < 1 for k in s.generator_steps):
            raise HypersdError(f"{where}: generator_steps must list step counts >= 1 (1: the one-step generator), "
                               f"got {s.generator_steps}")
        if not 0 <= s.generator_eta <= 1:
            raise HypersdError(f"{where}: generator_eta must be in [0, 1], got {s.generator_eta}")
        _gan(s, where)
        if s.red_weight < 0:
            raise HypersdError(f"{where}: red_weight must be >= 0 (0: no denoising regulariser), got {s.red_weight}")
        if s.red_weight > 0:
            _range(s.red_t_range, where, "red_t_range", 0)


def _gan(s: DMDStage, where: str) -> None:
    if s.gan_weight < 0:
        raise HypersdError(f"{where}: gan_weight must be >= 0 (0: no GAN term), got {s.gan_weight}")
    if s.gan_weight == 0:
        return
    if not s.gan_d_weight > 0:
        raise HypersdError(f"{where}: gan_d_weight must be > 0 with gan_weight > 0 (the classifier learns only from "
                           f"it; DMD2's is 1e-2), got {s.gan_d_weight}")
    if s.gan_hidden < 1:
        raise HypersdError(f"{where}: gan_hidden must be >= 1 with gan_weight > 0, got {s.gan_hidden}")
    _range(s.gan_t_range, where, "gan_t_range", 0)  # the top: the teacher's T, in check_timesteps


def _reward(r, where: str) -> dict:
    """One entry of a stage's ``rewards``, its values typed; a name no reward has is refused now,
    the weights themselves load before the first stage (trainer.check_rewards)."""
    from hypersd.rewards import REWARDS

    if not isinstance(r, dict) or "name" not in r:
        raise HypersdError(f"{where}: each reward is a mapping with a 'name', got {r!r}")
    at = f"{where}: reward {r['name']!r}"
    _check_keys(r, set(REWARD_HINTS), at)
    r = _typed(r, REWARD_HINTS, at)
    if r["name"] not in REWARDS:
        raise HypersdError(f"{at}: unknown reward; choose one of {', '.join(REWARDS)}")
    return r


def _perceptual_model(s: FeedbackStage, where: str) -> None:
    from hypersd.losses.feedback import PERCEPTION

    if s.perceptual_weight > 0 and s.perceptual_model not in PERCEPTION:
        raise HypersdError(f"{where}: perceptual_model {s.perceptual_model!r} is not one of {', '.join(PERCEPTION)}")


def _validate_settings(r: Recipe, source: str) -> None:
    """The recipe-wide values the trainer would refuse when it builds the student or saves."""
    from hypersd.lora import TARGET_PRESETS

    _rank(r.lora_rank, source, "lora_rank", "the default, 32")
    if r.lora_alpha is not None and r.lora_alpha <= 0:
        raise HypersdError(f"{source}: lora_alpha must be > 0 (or null: the rank), got {r.lora_alpha}")
    if isinstance(r.lora_targets, str) and r.lora_targets not in TARGET_PRESETS:
        raise HypersdError(f"{source}: lora_targets {r.lora_targets!r} is not a preset ({', '.join(TARGET_PRESETS)}) "
                           f"or a list of module-name suffixes")
    for key, lo in (("checkpoint_every", 1), ("checkpoint_keep", 0), ("eval_n", 1), ("eval_seeds", 1),
                    ("max_bad_steps", 1)):
        if getattr(r, key) < lo:
            raise HypersdError(f"{source}: {key} must be >= {lo}, got {getattr(r, key)}")
    if r.grad_clip <= 0:
        raise HypersdError(f"{source}: grad_clip must be > 0, got {r.grad_clip}")
    _validate_cfg(r, source)
    if any(not 0 <= eta <= 1 for eta in r.eval.etas):
        raise HypersdError(f"{source}: eval_etas must lie in [0, 1], got {r.eval.etas}")


def _validate_cfg(r: Recipe, source: str) -> None:
    if r.cfg not in ("bake", "preserve"):
        raise HypersdError(f"{source}: cfg must be 'bake' (guidance distilled in, sampled at guidance 1) or "
                           f"'preserve' (a LoRA sampled with CFG), got {r.cfg!r}")
    if r.cfg == "bake":
        return
    if not 0 < r.cfg_dropout < 1:
        raise HypersdError(f"{source}: cfg_dropout must be in (0, 1) with cfg: preserve (the student's unconditional "
                           f"prediction is learnt from the dropped prompts; 0.1 is PCM's), got {r.cfg_dropout}")
    if r.cfg_guidance is not None and r.cfg_guidance <= 1:
        raise HypersdError(f"{source}: cfg_guidance {r.cfg_guidance:g} is no classifier-free guidance; set it above 1 "
                           f"(5 for SD1.5/SDXL/SD3), or use cfg: bake for a LoRA sampled without CFG")


def check_timesteps(recipe: Recipe, source: str = "recipe", schedule=None) -> None:
    """Every step count, grid and timestep of the recipe on the teacher's ``NoiseSchedule`` (its own T
    and spacing): what a stage would otherwise refuse only when it starts, after the stages before it
    have trained. Without a schedule (a recipe read before its teacher is loaded): the schedule its
    backbone fixes by name, if any; the others are checked once the teacher is loaded (the trainer
    calls this again with the teacher's schedule)."""
    from hypersd.backbones import get_backbone
    from hypersd.core.schedule import Segments, SolverGrid, inference_timesteps
    from hypersd.losses.feedback import stop_options

    schedule = schedule or get_backbone(recipe.backbone).named_schedule()
    if schedule is None:
        return
    T, spacing = schedule.T, schedule.spacing
    family = f"the teacher's schedule (T={T}, {spacing} spacing)"

    def timesteps(k, where: str, key: str) -> list[int]:
        try:
            return inference_timesteps(k, T, spacing=spacing)
        except HypersdError as e:
            raise HypersdError(f"{where}: {key} {k}: {e}") from None

    def within(value, where: str, key: str) -> None:
        if not all(0 <= int(v) <= T - 1 for v in (value if isinstance(value, list) else [value])):
            raise HypersdError(f"{where}: {key} {value} is outside the timesteps 0..{T - 1} of {family}; "
                               f"set {key} in 0..{T - 1}")

    for k in recipe.eval.steps:
        timesteps(k, source, "eval_steps")
    one_step_t = None  # where an earlier DMD stage put the one-step sampler
    for s in recipe.stages:
        where = f"{source}: stage {s.name!r}"
        if isinstance(s, FeedbackStage) and 1 in s.sample_steps and one_step_t is not None:
            raise HypersdError(f"{where}: a feedback stage after DMD at generator_t {one_step_t} would train the "
                               f"one-step sampler at {T - 1}, where the LoRA is no longer sampled; put feedback "
                               f"before DMD (as the packaged recipes do), or leave 1 out of its sample_steps")
        if isinstance(s, DMDStage):
            one_step_t = None if s.generator_t == T - 1 else s.generator_t
        if isinstance(s, TSCDStage):
            try:
                grid = SolverGrid(T, s.solver_steps, spacing)
            except HypersdError as e:
                raise HypersdError(f"{where}: solver_steps {s.solver_steps}: {e}") from None
            try:
                Segments(s.segments, grid)
            except HypersdError as e:
                raise HypersdError(f"{where}: segments {s.segments} with solver_steps {s.solver_steps}: {e}") from None
        if isinstance(s, FeedbackStage):
            within(s.t_range, where, "t_range")
            within(s.perceptual_t, where, "perceptual_t")
            for k in s.sample_steps:
                timesteps(k, where, "sample_steps")
            if not stop_options(s.sample_steps, s.t_range, T, spacing):
                raise HypersdError(f"{where}: no step of a {s.sample_steps}-step sampler has its timestep in "
                                   f"t_range {s.t_range}; widen t_range")
        if isinstance(s, DMDStage):
            within(s.t_range, where, "t_range")
            if s.gan_weight > 0:
                within(s.gan_t_range, where, "gan_t_range")
            if s.red_weight > 0:
                within(s.red_t_range, where, "red_t_range")
            within(s.generator_t, where, "generator_t")
            if s.generator_t == 999 and T - 1 != 999:  # the T = 1000 default, left unset on another T (FLUX's 1200)
                raise HypersdError(f"{where}: generator_t 999 is the first step of a T=1000 schedule; on {family} "
                                   f"the first step is {T - 1}: set generator_t: {T - 1} (or the timestep you mean)")
            timesteps(s.reg_steps, where, "reg_steps")
            for k in s.generator_steps:
                timesteps(k, where, "generator_steps")
            keep = {t for k in s.keep_steps for t in timesteps(k, where, "keep_steps")} - {s.generator_t}
            if s.keep_weight > 0 and not keep:
                raise HypersdError(f"{where}: keep_steps {s.keep_steps} have no timestep but generator_t "
                                   f"{s.generator_t} to keep; list a step count > 1, or set keep_weight: 0")


def _validate_order(r: Recipe, source: str) -> None:
    """Each stage's input must exist when it runs: a distilled LoRA for feedback, merge and DMD
    (from an earlier tscd stage or ``init_lora``), and a feedback LoRA for a merge."""
    distilled, feedback = r.init_lora is not None, False
    for s in r.stages:
        where = f"{source}: stage {s.name!r}"
        if s.kind in ("feedback", "merge", "dmd") and not distilled:
            raise HypersdError(f"{where}: a {s.kind} stage needs a distilled LoRA to start from; put a tscd stage "
                               f"before it or set init_lora: PATH to a LoRA made by hypersd distill")
        if s.kind == "merge" and not feedback:
            raise HypersdError(f"{where}: nothing to merge; put a feedback stage before it")
        if s.kind == "feedback" and feedback:
            raise HypersdError(f"{where}: merge the previous feedback LoRA before training another")
        distilled = distilled or s.kind == "tscd"
        feedback = (feedback or s.kind == "feedback") and s.kind != "merge"


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
        _set(raw, _set_key(raw, key.strip()), yaml.safe_load(value), item)
    return from_dict(raw, str(path))


def _set_key(raw: dict, key: str) -> str:
    """An override's key in the form the file uses, flat or sectioned: ``--set eval_steps=...``
    on a sectioned recipe sets ``eval.steps``, and ``--set eval.steps=...`` on a flat one
    ``eval_steps``, so neither collides with the file's own key."""
    if not isinstance(raw, dict):  # refused, with the reason, by from_dict
        return key
    sectioned = {".".join(where): flat for flat, where in FLAT.items()}
    if key in FLAT and key not in raw:
        return ".".join(FLAT[key])
    if key in sectioned and sectioned[key] in raw:
        return sectioned[key]
    return key


def _set(raw: dict, key: str, value, item: str) -> None:
    """``a.b=v`` sets raw[a][b]; ``stages.NAME.k=v`` sets key k of the stage named NAME."""
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        if node is raw.get("stages") and isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if not match:
                names = ", ".join(str(s.get("name")) for s in node if isinstance(s, dict))
                raise HypersdError(f"--set {item}: no stage named {part!r}; stages: {names}")
            node = match[0]
            continue
        child = node.setdefault(part, {}) if part == "stage_defaults" else node.get(part)
        if child is None and isinstance(node, dict):
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise HypersdError(f"--set {item}: {part!r} holds no keys to set")
        node = child
    if not isinstance(node, dict):
        raise HypersdError(f"--set {item}: name a stage, as stages.NAME.{last}=...")
    node[last] = value


def resolve_path(name: str | Path) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    packaged = CONFIGS / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(q.stem for q in CONFIGS.glob("*.yaml")))
    raise HypersdError(f"config {name} not found: pass a YAML file or one of the packaged recipes ({known})")
