"""The ``hypersd`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hypersd.errors import HypersdError


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


DIGITS_EVAL_STEPS = [1, 2, 4, 8, 25, 40]


def _add_teacher_args(p: argparse.ArgumentParser, backbone: bool = True) -> None:
    p.add_argument("--teacher", default=None, help="digits teacher .safetensors (default: the shipped one)")
    if backbone:  # eval reads its file's kind instead
        p.add_argument("--backbone", choices=["digits", "digits-flow"], default="digits",
                       help="digits: the DDPM UNet teacher; digits-flow: the rectified-flow transformer teacher")


# -- commands ------------------------------------------------------------------------------
def cmd_teacher_train(a) -> None:
    from hypersd.digits.train_teacher import train_teacher
    from hypersd.outputs import check_writable

    a.out = a.out or ("runs/teacher-flow.safetensors" if a.family == "flow" else "runs/teacher.safetensors")
    check_writable(a.out, a.force)
    train_teacher(a.out, steps=a.steps, minutes=a.minutes, batch=a.batch, lr=a.lr, seed=a.seed, family=a.family)
    flag = " --backbone digits-flow" if a.family == "flow" else ""
    print(f"wrote {a.out}; pick its guidance with 'hypersd teacher guidance{flag} --teacher {a.out} --write'")


def cmd_teacher_guidance(a) -> None:
    from hypersd.digits.guidance import pick_guidance

    pick_guidance(a.teacher, a.scales, n=a.n, seeds=range(a.seeds), steps=a.steps, write=a.write, backbone=a.backbone)


def cmd_judges_train(a) -> None:
    from hypersd.digits.judges import save_judge, train_judge
    from hypersd.outputs import check_writable

    for name in ("reward", "evaluator"):
        path = check_writable(Path(a.out_dir) / f"{name}.safetensors", a.force)
        model, acc = train_judge(name, epochs=a.epochs, seed=a.seed)
        save_judge(model, name, path, acc)
        print(f"{name}: test-split accuracy {acc:.4f}, wrote {path}")


def cmd_sample(a) -> None:
    import numpy as np
    import torch

    from hypersd.core.sampling import sample_prompts
    from hypersd.digits.data import balanced_labels, prompts_for
    from hypersd.eval.grid import save_grid
    from hypersd.outputs import atomic_path, check_writable
    from hypersd.teachers import load_teacher

    if not a.out.endswith(".npz"):
        raise HypersdError(f"--out {a.out} must end in .npz (the grid is written beside it as .png)")
    out, png = check_writable(a.out, a.force), check_writable(a.out[:-4] + ".png", a.force)
    if a.n < 1:
        raise HypersdError("--n must be at least 1")
    teacher = load_teacher(a.backbone, a.teacher)
    guidance, one_step_t, eta = a.guidance, None, a.eta
    if a.lora:
        from hypersd.eval.digits import recorded_eta
        from hypersd.lora import load_lora

        meta = load_lora(teacher.unet, a.lora)
        guidance = meta.get("guidance", 1.0) if guidance is None else guidance
        one_step_t = meta.get("one_step_t")
        eta = recorded_eta(meta, a.steps) if eta is None else eta
    eta = 0.0 if eta is None else eta
    if not 0.0 <= eta <= 1.0:
        raise HypersdError(f"--eta is TCD's gamma, between 0 and 1; got {eta}")
    labels = balanced_labels(a.n) if a.digit is None else torch.full((a.n,), a.digit)
    x = teacher.decode(sample_prompts(teacher, prompts_for(labels), a.steps, guidance=guidance, eta=eta, seed=a.seed,
                                      one_step_t=one_step_t))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=x.numpy().astype(np.float32), labels=labels.numpy().astype(np.int64))
    save_grid(x, png)
    print(f"wrote {out} ({a.n} samples, {a.steps} steps, eta {eta:g}) and {png}")


def cmd_eval(a) -> None:
    from hypersd.eval.digits import JUDGES, DigitsBench, teacher_baseline, write_report
    from hypersd.eval.images import cmd_image_eval, real_only_flags
    from hypersd.outputs import check_writable
    from hypersd.teachers import load_teacher
    from hypersd.teachers.load import digits_world_of

    if a.images or a.model:
        return cmd_image_eval(a)
    if real_only_flags(a):
        raise HypersdError(f"{real_only_flags(a)[0]} is for real images: add --images DIR or --model M")
    for name in ("baseline.json", "baseline.md"):
        check_writable(Path(a.out_dir) / name, a.force)
    teacher = load_teacher(digits_world_of(a.teacher), a.teacher)  # a flow teacher's file: the flow world
    bench = DigitsBench(teacher, n=a.n, seeds=range(a.seeds), guidance=a.guidance)
    rows = teacher_baseline(bench, a.steps or DIGITS_EVAL_STEPS)
    meta = {"guidance": bench.guidance, "samples per seed": a.n, "seeds": a.seeds,
            "judges": JUDGES, "fd against": "real test digits"}
    js, md = write_report(rows, a.out_dir, "baseline", "Teacher baseline (digits world)", meta)
    print(md.read_text())
    print(f"wrote {js} and {md}")


def cmd_distill(a) -> None:
    import shutil

    from hypersd.train.recipe import load_recipe
    from hypersd.train.runtime import leave_process_group
    from hypersd.train.trainer import Distiller, check_rewards, has_run

    recipe = load_recipe(a.config, a.set)
    if a.teacher:
        recipe.teacher = a.teacher
    out = Path(a.out)
    if a.dry_run:
        print(f"# resolved recipe ({a.config}), fingerprint {recipe.fingerprint()} (of the method: the keys "
              f"above run:, which says how it runs, and eval:, what it measures)")
        print(recipe.dump(), end="", flush=True)
        # last, so the resolved recipe shows even where a reward cannot load here (say, offline)
        check_rewards(recipe)  # the reward weights, as a run loads them before its first stage
        return
    resumable = has_run(out)
    started = resumable or (out / "lora.safetensors").exists()
    if a.resume and not resumable:
        fix = "--force without --resume to start over" if started else "run without --resume to start one"
        raise HypersdError(f"{out} has no run to resume (no checkpoints in {out / 'checkpoints'}); {fix}")
    if started and not (a.resume or a.force):
        raise HypersdError(f"{out} already holds a run; pass --resume to continue it or --force to start over")
    if a.force and not a.resume and started:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "log.jsonl").unlink(missing_ok=True)  # starting over: the new run's log, not both
    distiller = Distiller(recipe, out, progress=not a.quiet, log_with=a.log_with)
    distiller.run(resume=a.resume)
    final = distiller.finish()
    leave_process_group(clean=True)  # no collective follows: process 0's report is its own
    if not distiller.rt.is_main:  # under accelerate launch: one process reports and writes the metrics
        return
    print(f"wrote {final}")
    print(f"log: {out / 'log.jsonl'} (a JSON line per step); 'hypersd log summary {out}' tabulates it, "
          f"docs/LOGS.md plots it" + (f"; tensorboard --logdir {out / 'tensorboard'}"
                                      if "tensorboard" in (a.log_with or []) else ""))
    if not a.no_eval:  # the backbone's own measure of the final LoRA (digits: the judges' table)
        print(distiller.backbone.evaluate(distiller, final))


def cmd_log_summary(a) -> None:
    from hypersd.train.runlog import summary

    print(summary(a.run_dir))


def cmd_bench(a) -> None:
    from hypersd.eval.bench import method_recipes, run_bench

    rows = run_bench(a.out, method_recipes(a.methods, a.backbone), a.steps, a.etas, n=a.n, seeds=a.seeds, teacher_path=a.teacher,
                     jobs=a.jobs)
    print((Path(a.out) / "bench.md").read_text())
    print(f"wrote {Path(a.out) / 'bench.json'} and {Path(a.out) / 'bench.md'} ({len(rows)} rows); "
          f"each method's LoRA is in {a.out}/METHOD/lora.safetensors")


def cmd_cache(a) -> None:
    from hypersd.data.cache import build_cache, describe_skips

    m = build_cache(a.backbone, a.model, a.data, a.out, resolution=a.resolution, batch=a.batch,
                    shard_size=a.shard_size, crop=a.crop, seed=a.seed, vae=a.vae, dtype=a.dtype,
                    image_column=a.image_column, caption_column=a.caption_column, device=a.device, force=a.force,
                    progress=not a.quiet, max_sequence_length=a.max_sequence_length, t5=not a.no_t5_cache,
                    buckets=a.buckets, bucket_step=a.bucket_step, bucket_max_ratio=a.bucket_max_ratio,
                    model_config=a.model_config)
    print(f"wrote {m['written']} items at {m['resolution']}px in {len(m['shards'])} shards to {a.out}; "
          f"skipped {sum(m['skipped'].values())} ({describe_skips(m['skipped'])}); "
          f"{m.get('bytes_per_item', 0) / 2**20:.2f} MiB an item"
          + (" (the mean over the buckets)" if m.get("buckets") else ""))
    if m.get("buckets"):
        held = ", ".join(f"{b['width']}x{b['height']} {b['items']}" for b in m["buckets"] if b["items"])
        print(f"buckets (width x height, items): {held}")


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypersd", description=(
        "Hyper-SD distillation: few-step diffusion from your own teacher. The embedded digits "
        "world runs the whole method on a CPU."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("teacher", help="train the digits teacher or pick its guidance scale",
                       description="The embedded digits teacher (one is shipped; these commands remake it).")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="train a digits teacher from scratch (about 30 min on 2 cores)")
    tt.add_argument("--family", choices=["ddpm", "flow"], default="ddpm",
                    help="ddpm: the epsilon UNet (the shipped teacher.safetensors); flow: the rectified-flow "
                         "transformer (teacher-flow.safetensors)")
    tt.add_argument("--out", default=None,
                    help="default: runs/teacher.safetensors, or runs/teacher-flow.safetensors for --family flow")
    tt.add_argument("--steps", type=int, default=4000)
    tt.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    tt.add_argument("--batch", type=int, default=128)
    tt.add_argument("--lr", type=float, default=1e-3)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    tt.set_defaults(fn=cmd_teacher_train)
    tg = tsub.add_parser("guidance", help="measure fd and acc over guidance scales and pick the default")
    _add_teacher_args(tg)
    tg.add_argument("--scales", type=_floats, default=[1.0, 1.5, 2.0, 3.0, 5.0])
    tg.add_argument("--steps", type=int, default=25, help="DDIM steps of the measurement")
    tg.add_argument("--n", type=int, default=1000)
    tg.add_argument("--seeds", type=int, default=3)
    tg.add_argument("--write", action="store_true", help="store the pick as the teacher file's default")
    tg.set_defaults(fn=cmd_teacher_guidance)

    j = sub.add_parser("judges", help="train the digits world's reward model and held-out evaluator")
    jsub = j.add_subparsers(dest="action", required=True, metavar="ACTION")
    jt = jsub.add_parser("train", help="train both judges on the train split")
    jt.add_argument("--out-dir", default="runs/judges")
    jt.add_argument("--epochs", type=int, default=40)
    jt.add_argument("--seed", type=int, default=0)
    jt.add_argument("--force", action="store_true")
    jt.set_defaults(fn=cmd_judges_train)

    s = sub.add_parser("sample", help="sample digits with the teacher or a distilled LoRA",
                       description="Writes images [N,1,8,8] in [-1,1] and labels to an .npz, and a PNG grid beside it.")
    _add_teacher_args(s)
    s.add_argument("--steps", type=int, required=True, help="sampling steps (a divisor of 1000)")
    s.add_argument("--lora", default=None, help="a hypersd LoRA .safetensors (without: the teacher, DDIM trailing)")
    s.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: teacher's measured default; with --lora the LoRA's recorded one: 1, "
                        "or a CFG LoRA's)")
    s.add_argument("--eta", type=float, default=None,
                   help="TCD gamma: 0 is DDIM, up to 1 (default: the LoRA's recommended eta at --steps, else 0)")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--digit", type=int, choices=range(10), default=None, help="only this digit (default: 0..9 in turn)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="FILE.npz")
    s.add_argument("--force", action="store_true", help="overwrite existing output files")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="the teacher baseline table: fd, acc, traj_mse, reward at 1..40 DDIM steps; "
                                    "with --images or --model: CLIP, aesthetic, ImageReward, HPSv2, PickScore, FID")
    _add_teacher_args(e, backbone=False)  # --backbone here is the real-image mode's (sd15, sdxl)
    e.add_argument("--steps", type=_ints, default=None, help="digits: 1,2,4,8,25,40; --model: one step count")
    e.add_argument("--n", type=int, default=1000, help="samples per seed")
    e.add_argument("--seeds", type=int, default=3)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--out-dir", default="runs/eval")
    e.add_argument("--force", action="store_true")
    from hypersd.eval.images import add_eval_args

    add_eval_args(e)
    e.set_defaults(fn=cmd_eval)

    from hypersd.cli.generate import add_generate_parser

    add_generate_parser(sub)

    d = sub.add_parser("distill", help="run a distillation recipe (default: TSCD 8->4->2->1 on the digits world)",
                       description="Runs the stages of a YAML recipe, checkpointing as it goes, and writes the "
                                   "final LoRA, sample grids and metrics.json/metrics.md.")
    d.add_argument("--config", default="digits", help="recipe YAML, or a packaged recipe name (default: digits)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a top-level recipe key")
    d.add_argument("--teacher", default=None, help="teacher path (overrides the recipe's)")
    d.add_argument("--out", default="runs/distill", help="output folder")
    d.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, load its rewards as a run would, and exit")
    d.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    d.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    d.add_argument("--no-eval", action="store_true", help="skip the metrics at the end")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--log-with", action="append", choices=["tensorboard", "wandb"], default=None,
                   help="also send the step scalars to TensorBoard (OUT/tensorboard) or Weights & Biases; "
                        "repeatable; needs pip install 'hypersd[tensorboard]' or 'hypersd[wandb]'")
    d.set_defaults(fn=cmd_distill)

    lg = sub.add_parser("log", help="read a distill run's log.jsonl",
                        description="Every distill run writes OUT/log.jsonl (see docs/LOGS.md).")
    lgsub = lg.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = lgsub.add_parser("summary", help="one row per stage: steps, skipped, losses start -> end, lr, grad norm")
    ls.add_argument("run_dir", help="a distill --out folder")
    ls.set_defaults(fn=cmd_log_summary)

    b = sub.add_parser("bench", help="LCM-style, phased, TSCD and Hyper-SD at one budget, each at 1/2/4/8 steps with "
                                     "its best eta, with Hyper-SD's ablation (TSCD, + feedback, + DMD)",
                       description="Distils each method (resuming any finished or partial run in --out), then "
                                   "writes bench.json and bench.md with the held-out evaluator's metrics.")
    _add_teacher_args(b)
    b.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                   default=["lcm", "phased", "tscd", "hypersd"],
                   help="comma-separated: lcm, phased, tscd (TSCD alone), hypersd (the default recipe)")
    b.add_argument("--steps", type=_ints, default=[1, 2, 4, 8])
    b.add_argument("--etas", type=_floats, default=[0.0, 0.3, 0.5, 1.0])
    b.add_argument("--n", type=int, default=1000)
    b.add_argument("--seeds", type=int, default=3)
    b.add_argument("--out", default="runs/bench")
    b.add_argument("--jobs", type=int, default=2,
                   help="methods trained at once, each as a one-thread process (1: in this process)")
    b.set_defaults(fn=cmd_bench)

    c = sub.add_parser("cache", help="precompute VAE latents and prompt embeddings of image-caption data (sd15, sdxl, sd3, flux)",
                       description="Encodes an image-caption folder (image + .txt), webdataset .tar shards or a "
                                   "datasets folder once, into safetensors shards that 'hypersd distill' reads "
                                   "(recipe key data:). Bad items are skipped and counted; a stopped run continues "
                                   "when run again with the same arguments. See docs/DATA.md.")
    c.add_argument("--backbone", required=True, choices=["sd15", "sdxl", "sd3", "flux"])
    c.add_argument("--model", required=True, help="the teacher: a diffusers folder or hub id (the recipe's teacher)")
    c.add_argument("--model-config", default=None,
                   help="sd3, flux: for a single .safetensors --model, its diffusers folder (text encoders, "
                        "tokenizers, configs; the recipe's teacher_config)")
    c.add_argument("--data", required=True, help="image folder, .tar shard or folder of them, or datasets folder")
    c.add_argument("--out", required=True, help="cache folder")
    c.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    c.add_argument("--crop", choices=["center", "random"], default="center",
                   help="crop after resizing to cover the square (or bucket); random: seeded per item")
    c.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets: each image to the size of about the square's area whose aspect "
                        "ratio is nearest its own, instead of the square; batches are drawn one bucket at a time")
    c.add_argument("--bucket-step", type=int, default=None, help="--buckets: pixels the sides are multiples of (64)")
    c.add_argument("--bucket-max-ratio", type=float, default=None,
                   help="--buckets: the longest side over the shortest, at most (2)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    c.add_argument("--batch", type=int, default=8, help="images encoded at once")
    c.add_argument("--shard-size", type=int, default=1000, help="items per shard")
    c.add_argument("--vae", default=None, help="a VAE in place of the model's own (folder or hub id)")
    c.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage precision")
    c.add_argument("--max-sequence-length", type=int, default=None,
                   help="sd3, flux: T5's tokens per prompt (default the model's: 256, FLUX.1-dev 512); training uses it")
    c.add_argument("--no-t5-cache", action="store_true",
                   help="sd3, flux: store no T5 states (most of an item); training encodes them each step")
    c.add_argument("--image-column", default=None, help="datasets folder: the image column (default: found)")
    c.add_argument("--caption-column", default=None, help="datasets folder: the caption column (default: found)")
    c.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    c.add_argument("--force", action="store_true", help="rebuild a cache that --out already holds")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=cmd_cache)

    from hypersd.cli import lora as lora_cli

    lora_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except HypersdError as e:
        print(f"hypersd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hypersd: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # what a command may have joined: a distill's process group
            from hypersd.train.runtime import leave_process_group

            leave_process_group(clean=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
