"""Scoring samplers on the digits world: same prompts, same noise, same judges, several seeds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .digits import data
from .digits.judges import Judges
from .lora import adapters_disabled
from .metrics import METRICS, frechet_distance, judge_samples, summarize
from .outputs import write_text
from .sampling import sample_prompts

REFERENCE_STEPS = 40

# sample_fn(prompts, seed) -> images [n, 1, 8, 8]
SampleFn = Callable[[list[str], int], torch.Tensor]


class DigitsBench:
    """Holds the prompts, the real test features and the teacher's 40-step references."""

    def __init__(self, teacher, judges: Judges | None = None, n: int = 1000, seeds=(0, 1, 2),
                 guidance: float | None = None, progress: bool = True):
        self.teacher, self.judges = teacher, judges or Judges()
        self.n, self.seeds, self.progress = n, tuple(seeds), progress
        self.guidance = teacher.default_guidance if guidance is None else guidance
        self.labels = data.balanced_labels(n)
        self.prompts = data.prompts_for(self.labels)
        self.real_features = self.judges.evaluate(data.load("test")[0])[0].numpy()
        self._references: dict[int, torch.Tensor] = {}

    def reference(self, seed: int) -> torch.Tensor:
        """The teacher's 40-step DDIM from the seed's noise: what traj_mse measures against.

        Costly (40 guided steps), so kept on disk per teacher, guidance, n and seed: first in the
        package (for the shipped teacher), then in the user's cache folder.
        """
        if seed not in self._references:
            key = self._reference_key(seed)
            cached = _read_cached(key)
            if cached is None:
                cached = self.teacher_sampler(REFERENCE_STEPS)(self.prompts, seed)
                _write_cached(key, cached)
            self._references[seed] = cached
        return self._references[seed]

    def _reference_key(self, seed: int) -> str | None:
        fp = getattr(self.teacher, "fingerprint", None)
        return None if fp is None else f"ref-{fp}-w{self.guidance:g}-n{self.n}-s{seed}-k{REFERENCE_STEPS}"

    def teacher_sampler(self, steps: int, eta: float = 0.0) -> SampleFn:
        """The teacher itself, even while a student LoRA sits on its UNet."""
        def fn(prompts, seed):
            with adapters_disabled(self.teacher.unet):
                x = sample_prompts(self.teacher, prompts, steps, guidance=self.guidance, eta=eta, seed=seed)
            return self.teacher.decode(x)
        return fn

    def score(self, sample_fn: SampleFn, desc: str = "") -> dict:
        per_seed = []
        for seed in tqdm(self.seeds, desc=desc or "seeds", disable=not self.progress, leave=False):
            images = sample_fn(self.prompts, seed)
            per_seed.append(judge_samples(images, self.labels, self.reference(seed), self.judges, self.real_features))
        return summarize(per_seed)

    def score_real(self) -> dict:
        """Real train digits as if they were samples: the floor any sampler is compared with."""
        x, y = data.load("train")
        per_seed = []
        for seed in self.seeds:
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: self.n]
            feats, pred = self.judges.evaluate(x[idx])
            with torch.no_grad():
                reward = self.judges.reward(x[idx], y[idx]).mean().item()
            per_seed.append({"fd": frechet_distance(feats.numpy(), self.real_features),
                             "acc": (pred == y[idx]).float().mean().item(), "reward": reward})
        return summarize(per_seed)


def cache_dir() -> Path:
    return Path(os.environ.get("HYPERSD_CACHE", Path.home() / ".cache" / "hypersd"))


def _read_cached(key: str | None) -> torch.Tensor | None:
    from safetensors.torch import load_file

    from .digits import ASSETS

    if key is None:
        return None
    for folder in (ASSETS / "references", cache_dir() / "references"):
        path = folder / f"{key}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["images"]
            except Exception:  # a damaged cache entry is recomputed, not trusted
                return None
    return None


def _write_cached(key: str | None, images: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from .outputs import atomic_path

    if key is None:
        return
    try:
        with atomic_path(cache_dir() / "references" / f"{key}.safetensors") as tmp:
            save_file({"images": images.contiguous()}, str(tmp))
    except OSError:  # a read-only home only costs recomputation
        pass


def teacher_baseline(bench: DigitsBench, steps=(1, 2, 4, 8, 25, 40)) -> list[dict]:
    """The rows of `hypersd eval`: the teacher with DDIM (trailing) at each step count."""
    rows = [{"method": "real digits (train split)", "steps": None, "eta": None, **bench.score_real()}]
    for k in tqdm(steps, desc="teacher DDIM", disable=not bench.progress):
        t0 = time.perf_counter()
        # The 40-step row is the reference itself: reuse it rather than sample it twice.
        fn = (lambda prompts, seed: bench.reference(seed)) if k == REFERENCE_STEPS else bench.teacher_sampler(k)
        summary = bench.score(fn, desc=f"{k} steps")
        rows.append({"method": "teacher DDIM", "steps": k, "eta": 0.0, **summary,
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def _cell(row: dict, metric: str) -> str:
    m = row.get(metric)
    if m is None:
        return "–"
    digits = 4 if metric == "traj_mse" else 3 if metric == "acc" else 2
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


def markdown_table(rows: list[dict], title: str, note: str = "") -> str:
    head = "| method | steps | eta | " + " | ".join(METRICS) + " | LoRA |"
    lines = [f"## {title}", "", note, "", head, "|" + "---|" * (4 + len(METRICS))]
    for r in rows:
        steps = "–" if r["steps"] is None else str(r["steps"])
        eta = "–" if r.get("eta") is None else f"{r['eta']:g}"
        used = Path(r["lora"]).parent.name if r.get("lora") else "–"
        lines.append(f"| {r['method']} | {steps} | {eta} | " + " | ".join(_cell(r, m) for m in METRICS) + f" | {used} |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out_dir: str | Path, name: str, title: str, meta: dict) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    note = ", ".join(f"{k}: {v}" for k, v in meta.items())
    md = markdown_table(rows, title, note)
    js, mdp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_text(js, json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_text(mdp, md)
    return js, mdp


def student_rows(bench: DigitsBench, method: str, steps=(1, 2, 4, 8), etas=(0.0,), guidance: float = 1.0,
                 loras: dict | None = None) -> list[dict]:
    """Rows for the UNet's student adapter, each step count at its best eta by fd.

    ``loras`` maps a step count to the LoRA file trained for it (a stage's); other step counts
    use the adapter as it is.
    """
    from . import lora

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
        used, one_step_t = None, None
        if loras and k in loras:
            one_step_t = lora.load_lora(bench.teacher.unet, loras[k], lora.STUDENT).get("one_step_t")
            used = str(loras[k])
        else:
            put_back()
        scored = {}
        # One step never re-noises, so every eta gives the same samples there.
        for eta in (etas if k > 1 else etas[:1]):
            def fn(prompts, seed, eta=eta, k=k, one_step_t=one_step_t):
                with lora.fused(bench.teacher.unet):
                    x = sample_prompts(bench.teacher, prompts, k, guidance=guidance, eta=eta, seed=seed,
                                       one_step_t=one_step_t)
                return bench.teacher.decode(x)
            scored[eta] = bench.score(fn, desc=f"{method} {k} steps eta {eta:g}")
        best = min(scored, key=lambda e: scored[e]["fd"]["mean"])
        row = {"method": method, "steps": k, "eta": best, **scored[best]}
        if used:
            row["lora"] = used
        if len(scored) > 1:
            row["eta_scan"] = {f"{e:g}": s["fd"]["mean"] for e, s in scored.items()}
        rows.append(row)
    put_back()
    return rows
