"""Scoring samplers on the digits world: same prompts, same noise, same judges, several seeds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from hypersd.core.sampling import sample_prompts
from hypersd.digits import data
from hypersd.digits.judges import Judges
from hypersd.eval.metrics import (
    DISTANCES,
    METRICS,
    PixelJudge,
    beats,
    judge_images,
    judge_samples,
    multiples,
    summarize,
    worse_on,
)
from hypersd.lora import adapters_disabled
from hypersd.outputs import read_metadata, write_text

REFERENCE_STEPS = 40
# The recommended eta of a LoRA is measured on a seed no table reports, so that the tables do
# not show a pick made on their own samples.
ETA_TUNE_SEED = 1000
ETA_TUNE_N = 500
JUDGES = "fd: held-out evaluator (CNN) features; pix_fd, bg_noise: pixels; all against real test digits"

# sample_fn(prompts, seed) -> images [n, 1, 8, 8]
SampleFn = Callable[[list[str], int], torch.Tensor]


class DigitsBench:
    """Holds the prompts, the real test features and pixels, and the teacher's samples."""

    def __init__(self, teacher, judges: Judges | None = None, n: int = 1000, seeds=(0, 1, 2),
                 guidance: float | None = None, progress: bool = True):
        self.teacher, self.judges = teacher, judges or Judges()
        self.n, self.seeds, self.progress = n, tuple(seeds), progress
        self.guidance = teacher.default_guidance if guidance is None else guidance
        self.labels = data.balanced_labels(n)
        self.prompts = data.prompts_for(self.labels)
        real = data.load("test")[0]
        self.real_features = self.judges.evaluate(real)[0].numpy()
        self.pixels = PixelJudge(real)
        self._references: dict[int, torch.Tensor] = {}
        self._teacher40: dict | None = None

    def reference(self, seed: int) -> torch.Tensor:
        """The teacher's 40-step DDIM from the seed's noise: what traj_mse measures against."""
        if seed not in self._references:
            self._references[seed] = self.teacher_images(REFERENCE_STEPS, seed)
        return self._references[seed]

    def teacher_images(self, steps: int, seed: int) -> torch.Tensor:
        """The teacher's DDIM at ``steps`` from the seed's noise and the bench's prompts (kept on disk)."""
        return teacher_images(self.teacher, self.n, steps, seed, self.guidance)

    def teacher40(self) -> dict:
        """The scores of the teacher's 40 steps: the row every distance is a multiple of."""
        if self._teacher40 is None:
            self._teacher40 = self.score(lambda prompts, seed: self.reference(seed), desc="teacher 40 steps")
        return self._teacher40

    def teacher_sampler(self, steps: int, eta: float = 0.0) -> SampleFn:
        """The teacher itself, even while a student LoRA sits on its UNet."""
        return lambda prompts, seed: teacher_sample(self.teacher, prompts, steps, self.guidance, seed, eta)

    def score(self, sample_fn: SampleFn, desc: str = "") -> dict:
        per_seed = []
        for seed in tqdm(self.seeds, desc=desc or "seeds", disable=not self.progress, leave=False):
            images = sample_fn(self.prompts, seed)
            per_seed.append(judge_samples(images, self.labels, self.reference(seed), self.judges, self.real_features,
                                          self.pixels))
        return summarize(per_seed)

    def score_real(self) -> dict:
        """Real train digits as if they were samples: the floor any sampler is compared with."""
        x, y = data.load("train")
        per_seed = []
        for seed in self.seeds:
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: self.n]
            per_seed.append(judge_images(x[idx], y[idx], self.judges, self.real_features, self.pixels))
        return summarize(per_seed)


def teacher_images(teacher, n: int, steps: int, seed: int, guidance: float | None = None) -> torch.Tensor:
    """The teacher's DDIM at ``steps`` from the seed's noise and ``n`` balanced prompts, decoded.

    Costly (guided steps over every prompt), so kept on disk per teacher, guidance, n, seed
    and step count: first in the package (for the shipped teacher), then in the user's cache.
    """
    w = teacher.default_guidance if guidance is None else guidance
    fp = getattr(teacher, "fingerprint", None)
    key = None if fp is None else f"ref-{fp}-w{w:g}-n{n}-s{seed}-k{steps}"
    cached = _read_cached(key)
    if cached is None:
        cached = teacher_sample(teacher, data.prompts_for(data.balanced_labels(n)), steps, w, seed)
        _write_cached(key, cached)
    return cached


def teacher_sample(teacher, prompts: list[str], steps: int, guidance: float, seed: int, eta: float = 0.0):
    """The teacher's own images for ``prompts``, decoded, even while a student LoRA sits on its UNet."""
    with adapters_disabled(teacher.unet):
        x = sample_prompts(teacher, prompts, steps, guidance=guidance, eta=eta, seed=seed)
    return teacher.decode(x)


def cache_dir() -> Path:
    return Path(os.environ.get("HYPERSD_CACHE", Path.home() / ".cache" / "hypersd"))


def _read_cached(key: str | None) -> torch.Tensor | None:
    from safetensors.torch import load_file

    from hypersd.digits import ASSETS

    if key is None:
        return None
    for folder in (ASSETS / "references", cache_dir() / "references"):
        path = folder / f"{key}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["images"].float()  # shipped ones may be float16
            except Exception:  # a damaged cache entry is recomputed, not trusted
                return None
    return None


def _write_cached(key: str | None, images: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from hypersd.outputs import atomic_path

    if key is None:
        return
    try:
        with atomic_path(cache_dir() / "references" / f"{key}.safetensors") as tmp:
            save_file({"images": images.contiguous()}, str(tmp))
    except OSError:  # a read-only home only costs recomputation
        pass


def teacher_method(teacher) -> str:
    """The teacher rows' name: its own deterministic sampler, DDIM (DDPM) or Euler (flow)."""
    return f"teacher {teacher.schedule.sampler}"


def teacher_baseline(bench: DigitsBench, steps=(1, 2, 4, 8, 25, 40)) -> list[dict]:
    """The rows of `hypersd eval`: the teacher with its sampler (trailing DDIM, or Euler on a flow
    teacher) at each step count."""
    rows = [{"method": "real digits (train split)", "steps": None, "eta": None, **bench.score_real()}]
    method = teacher_method(bench.teacher)
    for k in tqdm(steps, desc=method, disable=not bench.progress):
        t0 = time.perf_counter()
        summary = teacher_row_scores(bench, k)
        rows.append({"method": method, "steps": k, "eta": 0.0, **summary,
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def teacher_row_scores(bench: DigitsBench, steps: int) -> dict:
    if steps == REFERENCE_STEPS:  # the reference itself: scored once per bench
        return bench.teacher40()
    return bench.score(lambda prompts, seed: bench.teacher_images(steps, seed), desc=f"{steps} steps")


DIGITS = {"traj_mse": 4, "acc": 3, "bg_noise": 4, "pix_fd": 3}


def _cell(row: dict, metric: str, times: dict) -> str:
    m = row.get(metric)
    if m is None:
        return "–"
    digits = DIGITS.get(metric, 2)
    cell = f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"
    return cell + (f" ({times[metric]:.2f}x)" if metric in times else "")


def reference_row(rows: list[dict]) -> dict | None:
    """The teacher's 40-step row of a table (DDIM or Euler), if it has one."""
    return next((r for r in rows if r["method"] in ("teacher DDIM", "teacher Euler")
                 and r["steps"] == REFERENCE_STEPS), None)


def markdown_table(rows: list[dict], title: str, note: str = "", reference: dict | None = None) -> str:
    """The rows, each distance also as a multiple of ``reference`` (default: the table's 40-step
    teacher row) written "(1.20x)"."""
    reference = reference or reference_row(rows)
    head = "| method | steps | eta | " + " | ".join(METRICS) + " | LoRA |"
    lines = [f"## {title}", "", note, "", head, "|" + "---|" * (4 + len(METRICS))]
    for r in rows:
        steps = "–" if r["steps"] is None else str(r["steps"])
        eta = "–" if r.get("eta") is None else f"{r['eta']:g}"
        used = Path(r["lora"]).parent.name if r.get("lora") else "–"
        times = multiples(r, reference) if reference else {}
        lines.append(f"| {r['method']} | {steps} | {eta} | " + " | ".join(_cell(r, m, times) for m in METRICS)
                     + f" | {used} |")
    if reference:
        lines += ["", f"(Nx): the distance ({', '.join(DISTANCES)}) as a multiple of the teacher's "
                      f"{REFERENCE_STEPS} steps ({reference['method']}). A row is better than another only when it is better "
                      f"on every judge beyond the two seed spreads."]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out_dir: str | Path, name: str, title: str, meta: dict,
                 extra: str = "") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    note = ", ".join(f"{k}: {v}" for k, v in meta.items())
    reference = reference_row(rows)
    if reference:  # the multiples in the JSON too, so that no reader has to divide
        for r in rows:
            r["x_teacher40"] = multiples(r, reference)
    md = markdown_table(rows, title, note) + extra
    js, mdp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_text(js, json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_text(mdp, md)
    return js, mdp


def lora_sampler(teacher, steps: int, eta: float, guidance: float = 1.0, one_step_t: int | None = None) -> SampleFn:
    """The UNet with its student adapter as it is now, fused for speed."""
    from hypersd import lora

    def fn(prompts, seed):
        with lora.fused(teacher.unet):
            x = sample_prompts(teacher, prompts, steps, guidance=guidance, eta=eta, seed=seed, one_step_t=one_step_t)
        return teacher.decode(x)
    return fn


def pick_eta(scored: dict[float, dict], reference: dict) -> float:
    """The eta whose samples sit closest to the teacher's 40 steps on all distance judges at once:
    the least sum of their multiples of ``reference`` (so each judge weighs the same), not the
    least CNN fd alone, which is nearly blind to background noise."""
    return min(scored, key=lambda e: sum(multiples(scored[e], reference).values()))


def recorded_eta(meta: dict, steps: int) -> float:
    """A LoRA's recommended eta at ``steps`` (its metadata's recommended_eta), else the eta multi-step
    DMD trained that step count at (trained_eta), else 0 (DDIM)."""
    etas = {**(meta.get("trained_eta") or {}), **(meta.get("recommended_eta") or {})}
    return float(etas.get(str(steps), 0.0))


def recommend_etas(bench: DigitsBench, steps, etas, guidance: float = 1.0, one_step_t: int | None = None,
                   n: int = ETA_TUNE_N, seed: int = ETA_TUNE_SEED) -> tuple[dict[int, float], dict]:
    """Per step count, the eta of ``etas`` that ``pick_eta`` prefers for the UNet's adapter as it
    is, measured on n prompts of ``seed``: a seed the tables do not report, so the pick is not
    fitted to their samples. One step never re-noises: eta 0 there. Returns (picks, the scan)."""
    labels = data.balanced_labels(n)
    prompts = data.prompts_for(labels)
    picks, scan = {}, {}
    for k in steps:
        if k == 1 or len(etas) == 1:
            picks[k] = 0.0 if k == 1 else float(etas[0])
            continue
        scored = {}
        for eta in tqdm(etas, desc=f"eta at {k} steps", disable=not bench.progress, leave=False):
            images = lora_sampler(bench.teacher, k, eta, guidance, one_step_t)(prompts, seed)
            scored[float(eta)] = summarize([judge_images(images, labels, bench.judges, bench.real_features,
                                                         bench.pixels)])
        picks[k] = pick_eta(scored, bench.teacher40())
        scan[k] = {f"{e:g}": {m: round(v[m]["mean"], 4) for m in DISTANCES} for e, v in scored.items()}
    return picks, scan


def student_rows(bench: DigitsBench, method: str, steps=(1, 2, 4, 8), etas=None, guidance: float | None = None,
                 loras: dict | None = None) -> list[dict]:
    """Rows for the UNet's student adapter at each step count.

    ``etas`` None: each step count at the eta its LoRA file recommends (0 without one). Else each
    step count at the eta of ``etas`` that ``pick_eta`` prefers, picked on the very samples the
    row reports (so a little optimistic). ``loras`` maps a step count to the LoRA file trained for
    it (a stage's); other step counts use the adapter as it is. ``guidance`` None: the one a LoRA
    file records (a CFG LoRA's), else 1 (no CFG).
    """
    from hypersd import lora

    rows = []
    unet = bench.teacher.unet
    had = lora.STUDENT in getattr(unet, "peft_config", {})
    current, shape = (lora.get_state(unet, lora.STUDENT), lora.spec(unet, lora.STUDENT)) if had else (None, None)

    def put_back():  # the adapter as it was: stage LoRAs may differ from it in rank
        if current is None:
            lora.remove_lora(unet, lora.STUDENT)
            return
        lora.ensure_lora(unet, lora.STUDENT, **shape)
        lora.set_state(unet, current, lora.STUDENT)
        lora.activate(unet, lora.STUDENT)

    for k in tqdm(steps, desc=method, disable=not bench.progress):
        used, meta = None, {}
        if loras and k in loras:
            meta = lora.load_lora(bench.teacher.unet, loras[k], lora.STUDENT)
            used = str(loras[k])
        else:
            put_back()
        # One step never re-noises, so every eta gives the same samples there.
        tried = [recorded_eta(meta, k)] if etas is None else list(etas if k > 1 else etas[:1])
        w = meta.get("guidance", 1.0) if guidance is None else guidance
        scored = {eta: bench.score(lora_sampler(bench.teacher, k, eta, w, meta.get("one_step_t")),
                                   desc=f"{method} {k} steps eta {eta:g}") for eta in tried}
        best = pick_eta(scored, bench.teacher40()) if len(scored) > 1 else tried[0]
        row = {"method": method, "steps": k, "eta": best, **scored[best]}
        if used:
            row["lora"] = used
        if len(scored) > 1:
            row["eta_scan"] = {f"{e:g}": {m: s[m]["mean"] for m in DISTANCES} for e, s in scored.items()}
        rows.append(row)
    put_back()
    return rows


def distill_rows(bench: DigitsBench, final: str | Path, steps) -> tuple[list[dict], str]:
    """The end of `hypersd distill`: the teacher's 40 steps, then at each step count the teacher's
    DDIM beside the final LoRA (at its recommended eta); and a verdict per step count."""
    method = teacher_method(bench.teacher)
    rows = [{"method": "real digits (train split)", "steps": None, "eta": None, **bench.score_real()},
            {"method": method, "steps": REFERENCE_STEPS, "eta": 0.0, **bench.teacher40()}]
    verdicts = []
    for k in steps:
        teacher = {"method": method, "steps": k, "eta": 0.0, **teacher_row_scores(bench, k)}
        student = student_rows(bench, "distilled LoRA", [k], loras={k: final})[0]
        rows += [teacher, student]
        verdicts.append(_verdict(k, student, teacher, rows[1]))
    return rows, "\n" + "\n".join(verdicts) + "\n"


def _verdict(k: int, student: dict, teacher: dict, reference: dict) -> str:
    """One line: does the LoRA at k steps beat the teacher at k, and does it match its 40 steps?"""
    won, short = beats(student, teacher)
    vs_k = "beats it on every judge" if won else f"does not beat it beyond the spread on {', '.join(short)}"
    worse = worse_on(student, reference)
    vs_40 = (f"no worse than the teacher's {REFERENCE_STEPS} steps on any judge" if not worse
             else f"worse than the teacher's {REFERENCE_STEPS} steps on {', '.join(worse)}")
    sampler = teacher["method"].removeprefix("teacher ")
    return f"- {k} step{'s' * (k > 1)}: against the teacher's {k}-step {sampler} the LoRA {vs_k}; it is {vs_40}"


def distill_report(teacher, final: str | Path, out: str | Path, ev) -> str:
    """The end-of-run evaluation of a digits run: the final LoRA at every step count of ``ev``
    (the recipe's eval section; the unified LoRA is one file for 1 to 8 steps), each beside the
    teacher's DDIM at as many steps, written to ``out``/metrics.{json,md}; the text to print."""
    bench = DigitsBench(teacher, n=ev.n, seeds=range(ev.seeds))
    rows, verdicts = distill_rows(bench, final, ev.steps)
    meta = {"lora": str(final), "samples per seed": ev.n, "seeds": ev.seeds, "judges": JUDGES,
            "student guidance": read_metadata(final, "LoRA").get("guidance", 1.0),
            "LoRA eta": f"its recommended eta, picked of {ev.etas} on seed {ETA_TUNE_SEED}"}
    js, md = write_report(rows, out, "metrics", "Distilled LoRA beside its teacher (digits world)", meta,
                          extra=verdicts)
    return (f"{md.read_text()}\nwrote {js} and {md}; {out}/compare.png shows the teacher's 40 steps above the "
            f"LoRA's {', '.join(map(str, ev.steps))} steps, from the same noise and prompts")
