"""Paired comparison of two recipes over training seeds, from `levers.py --json` files.

A lever is judged against the baseline run of the same training seed, trained on the same machine
(docs/RESULTS.md: the same seed moves between machines by more than most levers do). This prints,
per step count and judge (multiples of the teacher's 40 steps), the baseline's and the candidate's
means over the pairs, the mean paired difference ± its standard error, and how many pairs the
candidate is lower (better) in.

    python benchmarks/paired.py --base l1-s0.json l1-s1.json --new n20-s0.json n20-s1.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

JUDGES = ("fd", "pix_fd", "bg_noise")


def rows_by_steps(path: Path) -> dict[int, dict[str, float]]:
    """{steps: {judge: multiple of the teacher's 40 steps}} of one levers.py JSON file (its first
    row at each step count)."""
    out: dict[int, dict[str, float]] = {}
    for row in json.loads(path.read_text())["rows"]:
        out.setdefault(int(row["steps"]), dict(row["x_teacher40"]))
    return out


def compare(base: list[Path], new: list[Path]) -> list[dict]:
    """One record per (steps, judge): means, the mean paired difference new − base, its standard
    error (None for one pair) and the count of pairs where new is lower."""
    if len(base) != len(new) or not base:
        raise SystemExit(f"need as many --base files as --new files (got {len(base)} and {len(new)})")
    pairs = [(rows_by_steps(b), rows_by_steps(n)) for b, n in zip(base, new)]
    steps = sorted(set.intersection(*(set(b) & set(n) for b, n in pairs)))
    out = []
    for k in steps:
        for j in JUDGES:
            d = [n[k][j] - b[k][j] for b, n in pairs]
            m = sum(d) / len(d)
            se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
            out.append({"steps": k, "judge": j, "base": sum(b[k][j] for b, _ in pairs) / len(pairs),
                        "new": sum(n[k][j] for _, n in pairs) / len(pairs), "diff": m, "se": se,
                        "lower": sum(x < 0 for x in d), "pairs": len(d)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", nargs="+", type=Path, required=True, help="baseline runs' levers.py JSON, by seed")
    ap.add_argument("--new", nargs="+", type=Path, required=True, help="the candidate's, in the same seed order")
    args = ap.parse_args(argv)
    print(f"{'steps':>5} {'judge':>8} {'base':>6} {'new':>6} {'new-base':>9} {'± se':>6}  lower in")
    for r in compare(args.base, args.new):
        se = "" if r["se"] is None else f"{r['se']:.3f}"
        print(f"{r['steps']:>5} {r['judge']:>8} {r['base']:>6.2f} {r['new']:>6.2f} {r['diff']:>+9.3f} {se:>6}"
              f"  {r['lower']} of {r['pairs']}")


if __name__ == "__main__":
    main()
