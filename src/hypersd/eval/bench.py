"""`hypersd bench`: distillation methods side by side on the digits world, at one budget.

Each method is a packaged recipe; all must spend the same training budget (Σ steps × batch).
Each is sampled at every step count with its best eta (by all the distance judges together,
``evaluation.pick_eta``) and the table says which. A
recipe with several kinds of stage also gives its ablation rows from the same run: the LoRA
after its TSCD stages, after the feedback merge, and the final (unified) one.
"""

from __future__ import annotations

import time
from pathlib import Path

from hypersd.errors import HypersdError
from hypersd.eval.digits import (
    JUDGES,
    DigitsBench,
    student_rows,
    teacher_baseline,
    write_report,
)
from hypersd.train.recipe import load_recipe

METHODS = {"lcm": "lcm", "phased": "phased", "tscd": "tscd", "hypersd": "digits"}
LABELS = {"lcm": "LCM-style", "phased": "phased (4 segments)", "tscd": "TSCD 8-4-2-1", "hypersd": "Hyper-SD"}


def method_loras(label: str, recipe, run_dir: Path, steps) -> list[tuple[str, dict]]:
    """(row label, step count -> LoRA file) for each row a finished run gives.

    One row per milestone of the recipe: after its last TSCD stage, after its merge, and its final
    LoRA; plus, for a recipe of several TSCD stages, each step count with its own stage's LoRA.
    """
    stage_file = lambda s: run_dir / "stages" / s.name / "lora.safetensors"  # noqa: E731
    final = run_dir / "lora.safetensors"
    kinds = [s.kind for s in recipe.stages]
    tscd = [s for s in recipe.stages if s.kind == "tscd"]
    merges = [s for s in recipe.stages if s.kind == "merge"]
    rows = []
    if len(tscd) > 1:
        rows.append((f"{label}: TSCD, stage LoRA per k", {s.segments: stage_file(s) for s in tscd}))
    if kinds == ["tscd"] * len(kinds):
        rows.append((label, {k: final for k in steps}))
        return rows
    rows.append((f"{label}: TSCD", {k: stage_file(tscd[-1]) for k in steps}))
    if merges:
        rows.append((f"{label}: TSCD + feedback", {k: stage_file(merges[-1]) for k in steps}))
    parts = " + ".join(dict.fromkeys({"tscd": "TSCD", "feedback": "feedback", "merge": "feedback",
                                      "dmd": "DMD"}[k] for k in kinds))
    rows.append((f"{label}: {parts} (final, unified)", {k: final for k in steps}))
    return rows


def budget(recipe) -> int:
    return sum(s.steps * s.batch for s in recipe.stages)


# The digits worlds: the same recipes on the DDPM UNet teacher or on the rectified-flow transformer
# (whose own Hyper-SD recipe is digits-flow.yaml; the baselines are the same recipes on its backbone).
WORLDS = {"digits": {}, "digits-flow": {"hypersd": "digits-flow"}}


def method_recipes(methods, backbone: str = "digits") -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise HypersdError(f"unknown bench method(s) {unknown}; choose from {', '.join(METHODS)}")
    if backbone not in WORLDS:
        raise HypersdError(f"hypersd bench runs on the digits worlds ({', '.join(WORLDS)}), not {backbone!r}")
    names = {m: WORLDS[backbone].get(m, METHODS[m]) for m in methods}
    return {m: load_recipe(names[m], [f"backbone={backbone}"]) for m in methods}


def train_all(out: Path, recipes: dict, jobs: int, progress: bool = True) -> dict[str, float]:
    """Distil each method into ``out/METHOD``, ``jobs`` at a time (each a one-thread process:
    on a small CPU two one-thread runs beat one two-thread run). A finished run is not redone."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from hypersd.outputs import write_text
    from hypersd.train.trainer import has_run

    def train(m: str) -> float:
        t0 = time.perf_counter()
        folder = out / m
        cfg = folder / "recipe.yaml"
        write_text(cfg, recipes[m].dump())
        cmd = [sys.executable, "-m", "hypersd", "distill", "--config", str(cfg), "--out", str(folder),
               *(["--resume"] if has_run(folder) else []), "--no-eval", "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(folder / "train.log", "w") as log:
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = (folder / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise HypersdError(f"training {m} failed ({tail[0]}); see {folder / 'train.log'}, then rerun to resume")
        seconds = round(time.perf_counter() - t0, 1)
        if progress:
            print(f"trained {m} in {seconds:.0f} s", flush=True)
        return seconds

    if progress:
        print(f"training {', '.join(recipes)} ({jobs} at a time; logs in {out}/METHOD/train.log)", flush=True)
    # the recipe with the costliest stages (DMD, feedback) first, so the others fill in beside it
    order = sorted(recipes, key=lambda m: -sum(s.kind != "tscd" for s in recipes[m].stages))
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return dict(zip(order, pool.map(train, order)))


def run_bench(out: str | Path, recipes: dict, steps=(1, 2, 4, 8), etas=(0.0, 0.3, 0.5, 1.0),
              n: int = 1000, seeds: int = 3, teacher_path: str | None = None, progress: bool = True,
              jobs: int = 1) -> list[dict]:
    from hypersd.train.trainer import Distiller, has_run

    out = Path(out)
    budgets = {m: budget(r) for m, r in recipes.items()}
    if len(set(budgets.values())) > 1:
        raise HypersdError(f"methods must share one training budget (steps x batch), got {budgets}")
    for recipe in recipes.values():
        if teacher_path:
            recipe.teacher = teacher_path
    timing = train_all(out, recipes, jobs, progress) if jobs > 1 else {}
    rows = []
    for m, recipe in recipes.items():
        t0 = time.perf_counter()
        d = Distiller(recipe, out / m, progress=progress)
        d.run(resume=has_run(out / m))  # a finished method's last checkpoint makes this a no-op
        d.finish()
        timing.setdefault(m, round(time.perf_counter() - t0, 1))
        bench = DigitsBench(d.teacher, n=n, seeds=range(seeds), progress=progress)
        if not rows:
            rows += [r for r in teacher_baseline(bench, [*steps, 40])]
        for label, loras in method_loras(LABELS.get(m, m), recipe, out / m, steps):
            rows += student_rows(bench, label, steps, etas, loras=loras)
    meta = {"budget (steps x batch)": next(iter(budgets.values())), "samples per seed": n, "seeds": seeds,
            "etas tried": list(etas),
            "eta pick": "least sum of fd, pix_fd, bg_noise multiples of the teacher's 40 steps, on the reported seeds",
            "judges": JUDGES, "train seconds": timing}
    write_report(rows, out, "bench", "Distillation methods at one budget (digits world)", meta)
    return rows
