"""`hypersd bench`: distillation methods side by side on the digits world, at one budget.

Each method is a packaged recipe; all must spend the same training budget (Σ steps × batch).
Each is sampled at every step count with its best eta (by fd) and the table says which.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import HypersdError
from .evaluation import DigitsBench, student_rows, teacher_baseline, write_report
from .recipe import load_recipe

METHODS = {"lcm": "lcm", "phased": "phased", "tscd": "digits"}
LABELS = {"lcm": "LCM-style", "phased": "phased (4 segments)", "tscd": "TSCD 8-4-2-1"}


def budget(recipe) -> int:
    return sum(s.steps * s.batch for s in recipe.stages)


def method_recipes(methods) -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise HypersdError(f"unknown bench method(s) {unknown}; choose from {', '.join(METHODS)}")
    return {m: load_recipe(METHODS[m]) for m in methods}


def run_bench(out: str | Path, recipes: dict, steps=(1, 2, 4, 8), etas=(0.0, 0.3, 0.5, 1.0),
              n: int = 1000, seeds: int = 3, teacher_path: str | None = None, progress: bool = True) -> list[dict]:
    from .trainer import Distiller

    out = Path(out)
    budgets = {m: budget(r) for m, r in recipes.items()}
    if len(set(budgets.values())) > 1:
        raise HypersdError(f"methods must share one training budget (steps x batch), got {budgets}")
    rows, timing = [], {}
    for m, recipe in recipes.items():
        if teacher_path:
            recipe.teacher = teacher_path
        t0 = time.perf_counter()
        d = Distiller(recipe, out / m, progress=progress)
        d.run(resume=True)  # a finished method's last checkpoint makes this a no-op
        d.finish()
        timing[m] = round(time.perf_counter() - t0, 1)
        bench = DigitsBench(d.teacher, n=n, seeds=range(seeds), progress=progress)
        if not rows:
            rows += [r for r in teacher_baseline(bench, [*steps, 40])]
        rows += student_rows(bench, LABELS.get(m, m), steps, etas, loras=d.stage_loras())
    meta = {"budget (steps x batch)": next(iter(budgets.values())), "samples per seed": n, "seeds": seeds,
            "etas tried": list(etas), "judge": "held-out evaluator (CNN)", "train seconds": timing}
    write_report(rows, out, "bench", "Distillation methods at one budget (digits world)", meta)
    return rows
