"""Faults, measured: SIGKILL ``hypersd`` commands at random moments and check what they leave.

  distill   a short digits recipe (three TSCD stages of 16 steps, one with the adversarial term,
            a checkpoint every 4 steps), killed at N random moments, each followed by --resume;
            the final lora.safetensors must equal the uninterrupted run's, byte for byte
  cache     ``hypersd cache`` of a folder of small images on a tiny SD1.5 model (saved by
            tests/sd_tiny.py), killed N times and run again; the finished cache folder must equal
            an uninterrupted one file for file, byte for byte
  convert   ``hypersd lora convert`` (to kohya), killed N times, alternately over an existing
            output and none: the output must be absent or whole (the uninterrupted run's bytes)
  fuse      ``hypersd lora fuse`` into a folder, the same check on every file of the folder
  generate  ``hypersd generate`` of 8 images, the same check on every image present

Every command runs as its own process with one thread (OMP_NUM_THREADS=1, so that each run does
the same arithmetic). A kill falls at a moment drawn (seeded) uniformly: for distill and cache,
0 to W/N seconds after the run's progress bar shows (W: the uninterrupted run's time from its
bar to its end), so every kill lands in the work (loading and imports, which write nothing, are
not aimed at) and all N land before the run ends; for the others, anywhere from the start to the end of the
uninterrupted run's wall time. Time lost per kill:
(wall of the killed and resumed runs together - wall of the uninterrupted run) / kills.

  python benchmarks/faults.py distill [--kills 10] [--seed 0] [--work DIR] [--json out.json]
  python benchmarks/faults.py all --kills 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS_RECIPE = """\
backbone: digits
seed: 0
lora_rank: 8
checkpoint_every: 4
checkpoint_keep: 2
grid_every_stage: false
eval_steps: [1]
stage_defaults: {batch: 8, lr: 5.0e-4, solver_steps: 8}
stages:
  - {name: tscd-4, segments: 4, steps: 16}
  - {name: tscd-2, segments: 2, steps: 16, adv_weight: 0.1}
  - {name: tscd-1, segments: 1, steps: 16}
"""


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), e.get("PYTHONPATH")]))
    return e


def hypersd(*args) -> list[str]:
    return [sys.executable, "-m", "hypersd", *map(str, args)]


def run(cmd, log: Path, kill_after: float | None = None, marker: str | None = None) -> dict:
    """Run ``cmd``; SIGKILL it ``kill_after`` seconds after ``marker`` first shows in its output (after
    its start without a marker), if still running. Returns its wall time, whether it was killed, and
    when the marker showed (None if never)."""
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        start, seen = len(log.read_bytes()), None
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=f, env=env())
        while p.poll() is None:
            now = time.perf_counter() - t0
            since = seen if marker else 0.0
            if kill_after is not None and since is not None and now >= since + kill_after:
                p.send_signal(signal.SIGKILL)
                p.wait()
                return {"wall": time.perf_counter() - t0, "killed": True, "marker_at": seen}
            if marker and seen is None and marker.encode() in log.read_bytes()[start:]:
                seen = now
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}); see {log}")
    return {"wall": wall, "killed": False, "marker_at": seen}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_and_resume(first, again, kills: int, rng: random.Random, window: tuple[float, float], log: Path,
                    marker: str, finished=lambda: False):
    """Kill at ``kills`` random moments, ``window`` seconds after each run's progress bar shows,
    rerunning ``again`` after each; then let it end. ``finished()``: whether a killed run had
    written everything (killed on its way out)."""
    walls, done, cmd = [], 0, first
    while True:
        moment = rng.uniform(*window) if done < kills else None
        r = run(cmd, log, kill_after=moment, marker=marker)
        walls.append(r["wall"])
        if not r["killed"]:
            return done, sum(walls)
        done, cmd = done + 1, again
        if finished():
            return done, sum(walls)


def resumable(name: str, cmd, resume_extra: list, out: Path, marker: str, kills: int, seed: int, work: Path,
              product, finished=lambda: False) -> dict:
    """The kill loop of a resumable command; ``product(folder)``: what must come out the same."""
    log = work / f"{name}.log"
    ref_out = out.with_name(out.name + "-uninterrupted")
    full = run(cmd(ref_out), log, marker=marker)
    if full["marker_at"] is None:
        raise SystemExit(f"{name}: no progress bar ({marker!r}) in its output; see {log}")
    window = (0.0, (full["wall"] - full["marker_at"]) / max(kills, 1))
    done, wall = kill_and_resume(cmd(out), cmd(out) + resume_extra, kills, random.Random(seed), window, log,
                                 marker, finished)
    want, got = product(ref_out), product(out)
    return {"command": name, "kills": done, "identical": want == got, "uninterrupted_s": round(full["wall"], 1),
            "bar_after_s": round(full["marker_at"], 1),
            "killed_and_resumed_s": round(wall, 1),
            "lost_per_kill_s": round((wall - full["wall"]) / done, 1) if done else None,
            "window_s": [round(w, 1) for w in window]}


def distill_kills(work: Path, kills: int = 10, seed: int = 0) -> dict:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(DIGITS_RECIPE)

    def cmd(out):
        return hypersd("distill", "--config", recipe, "--out", out, "--no-eval")

    def product(out):
        from safetensors.torch import load_file

        return (out / "lora.safetensors").read_bytes(), {k: v.tolist() for k, v in
                                                          load_file(str(out / "lora.safetensors")).items()}

    # each stage's bar, the first one a resumed run shows among them (every stage has 16 steps)
    r = resumable("distill", cmd, ["--resume"], work / "run", "/16 [", kills, seed, work, product)
    r["compared"] = "lora.safetensors byte for byte (and every tensor)"
    return r


# -- the commands on a tiny SD1.5 model ----------------------------------------------------------
def tiny_assets(work: Path, images: int = 384) -> dict:
    """A tiny SD1.5 model folder, a LoRA for it and a folder of captioned images."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from sd_tiny import save_tiny

    from hypersd import lora
    from hypersd.teachers import load_teacher

    model = work / "model"
    if not model.exists():
        save_tiny("sd15", model)
    lora_path = work / "lora.safetensors"
    if not lora_path.exists():
        teacher = load_teacher("sd15", str(model))
        lora.add_lora(teacher.unet, lora.lora_config(4, 8, "all"))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in lora.adapter_params(teacher.unet, lora.STUDENT):
                p.normal_(0, 0.3)
        lora.save_lora(lora_path, teacher.unet, {"kind": "hypersd-lora", "guidance": 1.0, "backbone": "sd15"})
    data = work / "images"
    if not data.exists():
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(images):
            Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(data / f"{i:04d}.png")
            (data / f"{i:04d}.txt").write_text(f"a photo of thing {i}\n")
    return {"model": model, "lora": lora_path, "data": data}


def cache_kills(work: Path, kills: int = 10, seed: int = 0) -> dict:
    a = tiny_assets(work)

    def cmd(out):
        return hypersd("cache", "--backbone", "sd15", "--model", a["model"], "--data", a["data"], "--out", out,
                       "--batch", 2, "--shard-size", 8, "--device", "cpu")

    def finished():  # a complete cache is refused, not redone, by the same command
        m = work / "cache" / "manifest.json"
        return m.is_file() and json.loads(m.read_text()).get("complete", False)

    r = resumable("cache", cmd, [], work / "cache", "cache:", kills, seed, work, files, finished)
    r["compared"] = "every file of the cache folder byte for byte (and no other file)"
    return r


def whole_or_absent(name: str, cmd, out: Path, ref: Path, kills: int, seed: int, work: Path, marker=None) -> dict:
    """Kill a one-shot command at random moments; after each, ``out`` must be absent or the
    uninterrupted run's, whole. Every other kill starts with a finished ``out`` already there.
    A run that ends before its moment is checked too, and another moment drawn (at most 3N runs)."""
    log = work / f"{name}.log"
    full = run(cmd(ref), log, marker=marker)
    rng, landed, torn, leftovers, i = random.Random(seed), 0, 0, set(), 0
    want = files(ref) if ref.is_dir() else {"": ref.read_bytes()}
    while landed < kills and i < 3 * kills:
        i += 1
        if out.is_dir():
            shutil.rmtree(out)
        out.unlink(missing_ok=True)
        if i % 2:  # a finished output the run overwrites (--force)
            (shutil.copytree if ref.is_dir() else shutil.copy)(ref, out)
        r = run(cmd(out), log, kill_after=rng.uniform(0, full["wall"]))
        landed += r["killed"]
        if out.exists():
            got = files(out) if out.is_dir() else {"": out.read_bytes()}
            got = {k: v for k, v in got.items() if ".tmp-" not in k}  # counted below, as leftovers
            # generate writes image by image: each one present must be whole
            torn += any(got[k] != want.get(k) for k in got) or (name != "generate" and got != want)
        leftovers |= {p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name}
        if out.is_dir():
            leftovers |= {p.name for p in out.iterdir() if ".tmp-" in p.name}
    return {"command": name, "kills": landed, "finished_before_kill": i - landed, "torn": torn,
            "uninterrupted_s": round(full["wall"], 1), "temporary_leftovers": len(leftovers)}


def convert_kills(work: Path, kills: int = 10, seed: int = 0) -> dict:
    a = tiny_assets(work)
    d = work / "convert"
    d.mkdir(exist_ok=True)
    r = whole_or_absent("convert", lambda out: hypersd("lora", "convert", a["lora"], out, "--to", "kohya", "--force"),
                        d / "out.safetensors", d / "ref.safetensors", kills, seed, d)
    r["compared"] = "the output file byte for byte"
    return r


def fuse_kills(work: Path, kills: int = 10, seed: int = 0) -> dict:
    a = tiny_assets(work)
    d = work / "fuse"
    d.mkdir(exist_ok=True)
    r = whole_or_absent("fuse", lambda out: hypersd("lora", "fuse", "--backbone", "sd15", "--model", a["model"],
                                                     "--lora", a["lora"], "--out", out, "--force"),
                        d / "out", d / "ref", kills, seed, d)
    r["compared"] = "every file of the fused folder byte for byte"
    return r


def generate_kills(work: Path, kills: int = 10, seed: int = 0) -> dict:
    a = tiny_assets(work)
    d = work / "generate"
    d.mkdir(exist_ok=True)
    r = whole_or_absent("generate", lambda out: hypersd("generate", "--model", a["model"], "--lora", a["lora"],
                                                         "--prompt", "a cat", "--per-prompt", 8, "--steps", 2,
                                                         "--batch-size", 1, "--device", "cpu", "--out", out,
                                                         "--force"),
                        d / "out", d / "ref", kills, seed, d)
    r["compared"] = "each image present byte for byte against the uninterrupted run's"
    return r


COMMANDS = {"distill": distill_kills, "cache": cache_kills, "convert": convert_kills, "fuse": fuse_kills,
            "generate": generate_kills}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=[*COMMANDS, "all"])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a new temporary one, removed after)")
    p.add_argument("--json", default=None, help="write the results here too")
    a = p.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="hypersd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in COMMANDS if a.command == "all" else [a.command]:
            r = COMMANDS[name](work, a.kills, a.seed)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
