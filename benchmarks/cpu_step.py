"""Where a digits training step spends its time on a CPU (docs/SPEED.md, "The digits steps on a CPU").

For the default recipe's stage kinds (a TSCD step, a feedback step, a DMD generator step with its
fake-score updates) at the recipe's batch 32, at each ``--threads`` count:

  step       seconds per step, wall clock and process CPU time (min over ``--repeats`` rounds of
             ``--steps`` steps: the machine may be shared, and CPU time is what load inflates least)
  passes     the step split by pass (exclusive wall and CPU time per step): each network role's
             forward (teacher CFG pair, student, EMA target, fake score, feedback), backward,
             gradient clipping, optimizer, reward model; "other" is the rest (jumps, noise, loss)
  ops        torch.profiler's top operators by self CPU time (``--ops N``)
  flops      the step's FLOPs (torch's flop counter, forward and backward) over its CPU time,
             against this CPU's measured peak: a large fp32 matmul, and 3x3 convolutions at the
             UNet's own shapes
  lora       a UNet forward (no grad) at batch 32 and at batch 1 (per-call overhead): without peft,
             with every adapter disabled, with one adapter active, with that adapter fused into
             the weights; and a role's adapter switch around an empty pass

  PYTHONPATH=src python benchmarks/cpu_step.py [--threads 1,2] [--stages tscd,feedback,dmd]
      [--steps 4] [--repeats 3] [--ops 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hypersd import lora
from hypersd.nets import roles as roles_mod
from hypersd.nets import speed
from hypersd.train import stages as stages_mod
from hypersd.train.recipe import load_recipe
from hypersd.train.stages import stage_run
from hypersd.train.trainer import Distiller, train_step

# the stage of the default recipe each kind is measured on (tscd-1: its longest TSCD stage)
STAGES = {"tscd": "tscd-1", "feedback": "feedback", "dmd": "dmd"}


class PassTimer:
    """Exclusive wall and process CPU time per category: a category's time leaves out the
    categories nested in it."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.stack.append([name, time.perf_counter(), time.process_time(), 0.0, 0.0])
        try:
            yield
        finally:
            name, w0, c0, inner_w, inner_c = self.stack.pop()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            self.wall[name] += wall - inner_w
            self.cpu[name] += cpu - inner_c
            if self.stack:
                self.stack[-1][3] += wall
                self.stack[-1][4] += cpu


@contextlib.contextmanager
def instrumented(timer: PassTimer):
    """Each role's forward, backward, clipping, optimizer steps and the reward model, timed."""
    saved = []

    def patch(owner, attr, label):
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def wrapped(*args, **kwargs):
            name = label(*args) if callable(label) else label
            with timer(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, wrapped)

    patch(roles_mod.Role, "__call__", lambda role, *a: role.name)
    patch(roles_mod.Role, "cfg", lambda role, *a: f"{role.name} CFG pair")
    patch(torch.Tensor, "backward", "backward")
    patch(torch.nn.utils, "clip_grad_norm_", "clip")
    patch(torch.optim.AdamW, "step", "optimizer")
    patch(stages_mod, "reward_loss", "reward model")
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


class Bench:
    """A default-recipe Distiller and one stage run of each measured kind, built in recipe order."""

    def __init__(self):
        # no fake-score warm-up: it is the stage's start, not its step
        self.recipe = load_recipe("digits", ["stages.dmd.fake_warmup=0"])
        self.d = Distiller(self.recipe, tempfile.mkdtemp(prefix="hypersd-cpu-step-"), progress=False)
        self.by_name = {s.name: s for s in self.recipe.stages}
        self.runs: dict[str, tuple] = {}

    def run_for(self, kind: str):
        if kind not in self.runs:
            unet = self.d.teacher.unet
            if kind == "dmd" and lora.FEEDBACK in unet.peft_config:  # the merge stage's end state
                lora.remove_lora(unet, lora.FEEDBACK)
                lora.activate(unet, lora.STUDENT, trainable=(lora.STUDENT,))
            stage = self.by_name[STAGES[kind]]
            run = stage_run(self.d.stage_context(), stage)
            run.enter(fresh=True)
            self.runs[kind] = (stage, run, speed.optimizer(run.params, stage.lr))
        return self.runs[kind]

    def rewind(self) -> None:
        """The same batches, noise and draws again (a feedback step's cost depends on its drawn stop)."""
        self.d.generator.manual_seed(self.recipe.seed)

    def steps(self, kind: str, n: int) -> None:
        for _ in range(n):
            self.step(kind)

    def step(self, kind: str) -> None:
        stage, run, opt = self.run_for(kind)
        z, prompts, cond = self.d.batch(stage.batch)
        train_step(self.d.rt, run, opt, z, prompts, cond, self.recipe.grad_clip)


def time_steps(bench: Bench, kind: str, steps: int, repeats: int) -> dict:
    bench.step(kind)  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        bench.rewind()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            bench.step(kind)
        walls.append((time.perf_counter() - w0) / steps)
        cpus.append((time.process_time() - c0) / steps)
    return {"wall_s": min(walls), "cpu_s": min(cpus), "wall_all": [round(w, 3) for w in walls]}


def pass_split(bench: Bench, kind: str, steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{category: (wall, CPU) seconds per step}, each the min over ``repeats`` rounds."""
    best: dict[str, list[float]] = {}
    for _ in range(repeats):
        bench.rewind()
        timer = PassTimer()
        with instrumented(timer):
            for _ in range(steps):
                with timer("other"):
                    bench.step(kind)
        for k in timer.wall:
            w, c = timer.wall[k] / steps, timer.cpu[k] / steps
            old = best.get(k, [float("inf")] * 2)
            best[k] = [min(old[0], w), min(old[1], c)]
    return dict(sorted(((k, tuple(v)) for k, v in best.items()), key=lambda kv: -kv[1][1]))


def op_table(bench: Bench, kind: str, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            bench.step(kind)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=55)


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def best_time(fn, iters: int = 5, repeats: int = 5) -> tuple[float, float]:
    """Seconds per call of ``fn``: the fastest round's wall clock and the fastest round's CPU time."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iters):
            fn()
        wall = min(wall, (time.perf_counter() - w0) / iters)
        cpu = min(cpu, (time.process_time() - c0) / iters)
    return wall, cpu


def peaks() -> dict[str, float]:
    """GFLOP/s of a large fp32 matmul (near this CPU's peak) and of 3x3 convolutions at shapes the
    digits UNet runs (8x8 and 4x4 maps, 32 to 128 input channels)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out = {"matmul 1024^3": 2 * 1024**3 / best_time(lambda: a @ b)[0] / 1e9}
    with torch.no_grad():
        for batch, cin, cout, size in ((32, 32, 32, 8), (32, 64, 64, 4), (64, 128, 64, 8)):
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            x = torch.randn(batch, cin, size, size)
            flops = 2 * batch * cout * size * size * cin * 9
            out[f"conv3x3 b{batch} {cin}->{cout} {size}x{size}"] = flops / best_time(partial(conv, x), 20)[0] / 1e9
    return out


def unet_forward(bench: Bench) -> dict:
    """A no-grad forward at batch 32 and at batch 1 (where nearly all of it is per-call overhead):
    the bare UNet (no peft), peft's layers with every adapter disabled, one adapter active, that
    adapter fused into the weights; and one role's adapter switch around an empty pass."""
    from hypersd.teachers.digits import DigitsTeacher

    teacher, unet = bench.d.teacher, bench.d.teacher.unet
    bare = DigitsTeacher.load(bench.recipe.teacher)
    rows: dict[str, dict] = defaultdict(dict)
    flops = {}
    with torch.no_grad():
        for batch in (32, 1):
            inputs = (torch.randn(batch, *teacher.latent_shape), torch.full((batch,), 500),
                      teacher.encode_prompt(["a handwritten digit three"] * batch))
            ours, plain = partial(teacher.eps, *inputs), partial(bare.eps, *inputs)
            rows["bare UNet (no peft)"][batch] = best_time(plain)
            with lora.adapters_disabled(unet):
                rows["adapters disabled (teacher pass)"][batch] = best_time(ours)
            with lora.adapter(unet, lora.STUDENT):
                rows["student adapter active"][batch] = best_time(ours)
                if batch == 32:
                    flops["lora"], flops["bare"] = count_flops(ours), count_flops(plain)
                with lora.fused(unet):
                    rows["student adapter fused"][batch] = best_time(ours)
        role = bench.d.stage_context().roles.ema
        rows["role switch (EMA target, empty pass)"][0] = best_time(lambda: _enter_exit(role), 20)
    return {"flops_forward": flops["bare"], "flops_forward_lora": flops["lora"], "seconds": dict(rows)}


def _enter_exit(role) -> None:
    with role.running():
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--stages", default="tscd,feedback,dmd")
    p.add_argument("--steps", type=int, default=4, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the fastest is reported")
    p.add_argument("--ops", type=int, default=15, help="rows of the operator table (0: none)")
    p.add_argument("--no-lora", action="store_true", help="skip the UNet forward / LoRA overhead table")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    kinds = [k for k in a.stages.split(",") if k]
    bench = Bench()
    out: dict = {"load": os.getloadavg(), "threads": {}}
    for threads in [int(n) for n in a.threads.split(",")]:
        torch.set_num_threads(threads)
        res = out["threads"][threads] = {"peak_gflops": peaks(), "stages": {}}
        print(f"\n== {threads} thread(s) ==")
        for name, g in res["peak_gflops"].items():
            print(f"peak  {name:34s} {g:7.1f} GFLOP/s")
        for kind in kinds:
            bench.step(kind)
            row = time_steps(bench, kind, a.steps, a.repeats)
            bench.rewind()
            row["flops"] = count_flops(partial(bench.steps, kind, a.steps)) / a.steps
            row["gflops_per_cpu_s"] = row["flops"] / row["cpu_s"] / 1e9
            row["passes"] = pass_split(bench, kind, a.steps, a.repeats)
            res["stages"][kind] = row
            row["floor_s"] = row["flops"] / (res["peak_gflops"]["matmul 1024^3"] * 1e9)
            print(f"\n{kind} ({STAGES[kind]}): {row['wall_s']:.3f} s/step wall (rounds {row['wall_all']}), "
                  f"{row['cpu_s']:.3f} s CPU; {row['flops'] / 1e9:.1f} GFLOP/step = "
                  f"{row['gflops_per_cpu_s']:.1f} GFLOP per CPU-second, {row['flops'] / row['wall_s'] / 1e9:.1f} "
                  f"per wall second; at the matmul peak {row['floor_s']:.3f} s")
            print(f"  {'pass':24s} {'wall s':>7s} {'CPU s':>7s}")
            for name, (w, c) in row["passes"].items():
                print(f"  {name:24s} {w:7.3f} {c:7.3f}")
            if a.ops:
                print(op_table(bench, kind, 2, a.ops))
        if not a.no_lora:
            res["unet"] = unet_forward(bench)
            u = res["unet"]
            print(f"\nUNet forward at batch 32: {u['flops_forward'] / 1e9:.2f} GFLOP bare, "
                  f"{u['flops_forward_lora'] / 1e9:.2f} GFLOP with the rank-32 LoRA")
            print(f"  {'ms (wall / CPU)':38s} {'batch 32':>15s} {'batch 1':>15s}")
            for name, cells in u["seconds"].items():
                print(f"  {name:38s} " + " ".join(f"{w * 1e3:7.1f}/{c * 1e3:<7.1f}" for w, c in cells.values()))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
