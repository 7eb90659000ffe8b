"""Choosing the digits teacher's default guidance scale by measurement.

On this world guidance can cost more diversity (fd) than it buys accuracy, so the pick is the
scale with the lowest fd among those whose acc is within ``acc_slack`` of the best acc.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from hypersd.eval.digits import DigitsBench
from hypersd.teachers import load_teacher


def pick_guidance(teacher_path, scales, n=1000, seeds=range(3), steps=25, write=False, acc_slack=0.005,
                  backbone: str = "digits"):
    teacher = load_teacher(backbone, teacher_path)
    results = {}
    for w in scales:
        bench = DigitsBench(teacher, n=n, seeds=seeds, guidance=w)
        # The pick needs fd and acc only, not traj_mse's 40-step reference: each seed's samples
        # stand in as their own reference, sampled once.
        sampler, drawn = bench.teacher_sampler(steps), {}
        bench.reference = drawn.__getitem__
        s = bench.score(lambda prompts, seed: drawn.setdefault(seed, sampler(prompts, seed)), desc=f"w={w}")
        results[w] = s
        tqdm.write(f"guidance {w:g}: fd {s['fd']['mean']:.2f} ± {s['fd']['std']:.2f}, "
              f"acc {s['acc']['mean']:.4f} ± {s['acc']['std']:.4f}, reward {s['reward']['mean']:.3f}")
    best_acc = max(s["acc"]["mean"] for s in results.values())
    eligible = [w for w, s in results.items() if s["acc"]["mean"] >= best_acc - acc_slack]
    pick = min(eligible, key=lambda w: results[w]["fd"]["mean"])
    print(f"picked guidance {pick:g} (lowest fd among scales with acc within {acc_slack} of the best)")
    if write:
        teacher.default_guidance = pick
        teacher.info = {**teacher.info, "guidance_scan": {f"{w:g}": {k: v["mean"] for k, v in s.items() if k != "traj_mse"}
                                                          for w, s in results.items()}, "guidance_steps": steps}
        teacher.save(teacher_path or teacher.DEFAULT_PATH)
        print("stored it as the teacher's default guidance")
    return pick, results
