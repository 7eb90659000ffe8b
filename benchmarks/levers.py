"""Score LoRAs as the RESULTS "Levers measured" tables do: DigitsBench on seeds 0, 1, 2 × 500
samples, 1 step at eta 0, 2 / 4 / 8 steps at the given etas; every distance (fd, pix_fd,
bg_noise) as a multiple of the teacher's 40 steps (DDIM, or Euler on the flow world) on the same
seeds and samples, with the seed spread (std over the seeds) beside each mean.

  python benchmarks/levers.py A=runs/a/lora.safetensors B=runs/b/lora.safetensors \
      [--etas 0.5,0] [--n 500] [--seeds 3] [--json out.json] [--backbone digits-flow]

A PATH may also be a run's checkpoint folder (checkpoints/step-N): its student adapter is scored
with the metadata (rank, targets, one_step_t) of the LoRA given by --meta, e.g. the stage's final
lora.safetensors, so one long run gives a curve of quality against training steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hypersd.eval.digits import DigitsBench, student_rows
from hypersd.eval.metrics import DISTANCES, multiples
from hypersd.lora.files import read_lora, save_state
from hypersd.teachers.load import load_teacher


def score(bench: DigitsBench, name: str, path: str, steps, etas) -> list[dict]:
    rows = []
    for k in steps:
        for eta in ([0.0] if k == 1 else etas):
            t0 = time.perf_counter()
            row, = student_rows(bench, name, [k], etas=[eta], loras={k: path})
            row["x_teacher40"] = multiples(row, bench.teacher40())
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(line(row), flush=True)
    return rows


def checkpoint_lora(folder: str, meta_from: str, out_dir: str) -> str:
    """A LoRA file of a checkpoint's student adapter, with another LoRA file's metadata."""
    if not meta_from:
        raise SystemExit(f"{folder} is a checkpoint folder: give --meta LORA for its rank and targets")
    state, _ = read_lora(Path(folder) / "lora-student.safetensors")
    _, meta = read_lora(meta_from)
    meta = {k: v for k, v in meta.items() if k not in ("recommended_eta", "recommended_from")}
    return str(save_state(Path(out_dir) / f"{Path(folder).name}.safetensors", state, meta))


def line(row: dict) -> str:
    x = row["x_teacher40"]
    cells = " / ".join(f"{x[m]:.2f}" for m in DISTANCES)
    spread = " / ".join(f"{row[m]['std']:.4g}" for m in DISTANCES)
    return (f"{row['method']:>20} {row['steps']} steps eta {row['eta']:g}: {cells} (spread {spread}) "
            f"acc {row['acc']['mean']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("loras", nargs="+", help="NAME=PATH of a hypersd LoRA")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--etas", default="0.5,0", help="etas for 2 steps and more (1 step: eta 0)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--meta", default=None, help="a LoRA whose metadata a checkpoint folder's student takes")
    p.add_argument("--backbone", choices=["digits", "digits-flow"], default="digits",
                   help="the digits world whose shipped teacher the LoRAs were distilled from")
    a = p.parse_args()
    torch.set_num_threads(1)
    bench = DigitsBench(load_teacher(a.backbone), n=a.n, seeds=range(a.seeds), progress=False)
    ref = bench.teacher40()
    print("teacher 40 steps: " + " / ".join(f"{m} {ref[m]['mean']:.4g}" for m in DISTANCES), flush=True)
    out = {"teacher40": ref, "rows": []}
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:  # checkpoints' LoRA files, while scored
        for spec in a.loras:
            name, path = spec.split("=", 1)
            if Path(path).is_dir():
                path = checkpoint_lora(path, a.meta, tmp)
            out["rows"] += score(bench, name, path, [int(k) for k in a.steps.split(",")],
                                 [float(e) for e in a.etas.split(",")])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
