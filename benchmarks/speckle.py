"""Background speckle of few-step digits samples: pixel statistics next to the project's judge.

For the teacher (DDIM) or each LoRA given, at each step count and eta, samples the bench's
prompts (0..9 in turn) from one seed's noise and prints:

  fd, acc, traj_mse   the project's judge (hypersd.eval.digits.DigitsBench: CNN features, the
                      held-out evaluator), and the teacher's 40-step DDIM from the same noise
  pfd                 Fréchet distance of the raw 64 pixels to the 360 real test digits
  bg                  mean brightness (0..1) of the background pixels: those dark in at least 95%
                      of the real test digits; the real test digits' own value is printed first
  bg>0.1              share of those background pixels brighter than 0.1 (a visible speckle)
  ×pfd, ×bg           pfd and bg−bg_real as multiples of the teacher's 40-step values

With ``--eps``, for one-step samples also the ε-amplification split: at t = 999 the ε that would
map the noise exactly onto the teacher's 40-step output is ε* = (x_T − √ᾱ·x_ref)/√(1−ᾱ); the
student's ε error (ε − ε*) and the image error it makes (x0 − x_ref, √((1−ᾱ)/ᾱ) ≈ 15 times the
ε error) are printed as RMS over background and over digit pixels (digit: the reference > −0.5).

Only test-split statistics are used: nothing here is fitted on the train split.

  python benchmarks/speckle.py --teacher-steps 1,40 --lora runs/distill/lora.safetensors \
      --steps 1,2,4,8 --etas 0,0.3 [--n 1000] [--seed 0] [--eps] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from hypersd import lora
from hypersd.core.sampling import guided, initial_noise, sample_prompts
from hypersd.core.schedule import alpha_bar, inference_timesteps
from hypersd.digits import data
from hypersd.eval.digits import REFERENCE_STEPS, DigitsBench
from hypersd.eval.frechet import frechet_distance
from hypersd.eval.grid import save_grid
from hypersd.teachers.digits import DigitsTeacher

BACKGROUND_SHARE = 0.95  # a pixel dark in at least this share of real test digits is background
DARK = -0.9  # below this a pixel is dark: raw value 0 of 16 is −1 in [−1, 1]
SPECKLE = 0.1  # a background pixel brighter than this (0..1) is a visible speck


def background_mask(real: torch.Tensor) -> torch.Tensor:
    """[8, 8] bool: pixels dark in ≥ 95% of ``real``."""
    return ((real < DARK).float().mean(0)[0] >= BACKGROUND_SHARE)


def pixel_stats(images: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> dict:
    """pfd to ``real`` and the background brightness of ``images`` (both in [−1, 1])."""
    images = images.clamp(-1, 1)
    bright = (images[:, 0][:, mask] + 1) / 2
    return {"pfd": frechet_distance(images.flatten(1).numpy(), real.flatten(1).numpy()),
            "bg": bright.mean().item(), "bg_speck": (bright > SPECKLE).float().mean().item()}


def eps_split(teacher, bench: DigitsBench, seed: int, guidance: float, one_step_t: int | None,
              mask_bg: torch.Tensor) -> dict:
    """RMS ε error and x0 error of the one-step sample against the teacher's 40-step output."""
    t = inference_timesteps(1, teacher.T, one_step_t)[0]
    a = alpha_bar(teacher.alphas_cumprod, t).float()
    noise, _ = initial_noise(bench.n, teacher.latent_shape, seed)
    ref = bench.reference(seed).float()
    cond = teacher.encode_prompt(bench.prompts)
    with torch.no_grad(), lora.fused(teacher.unet):
        eps = guided(teacher, cond, guidance)(noise, t).float()
    eps_star = (noise - a.sqrt() * ref) / (1 - a).sqrt()
    x0 = ((noise - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    bg = mask_bg.expand_as(ref[:, 0]) & (ref[:, 0] < -0.5)
    digit = ref[:, 0] > -0.5
    e_err, x_err = (eps - eps_star)[:, 0], (x0 - ref.clamp(-1, 1))[:, 0]
    # How much of the input noise is left in the image: the slope of the unclamped x0 error on x_T
    # over background pixels (0: the noise is cancelled; the error is then something else).
    raw_err, z = ((noise - (1 - a).sqrt() * eps) / a.sqrt() - ref)[:, 0][bg], noise[:, 0][bg]
    leak = ((raw_err * z).mean() / z.pow(2).mean()).item()
    leak_corr = torch.corrcoef(torch.stack([raw_err, z]))[0, 1].item()
    rms = lambda v, m: v[m].pow(2).mean().sqrt().item()  # noqa: E731
    return {"t": t, "amp": math.sqrt((1 - a) / a), "eps_rms_bg": rms(e_err, bg), "eps_rms_digit": rms(e_err, digit),
            "x0_rms_bg": rms(x_err, bg), "x0_rms_digit": rms(x_err, digit),
            "x0_bias_bg": x_err[bg].mean().item(), "raw_rms_bg": raw_err.pow(2).mean().sqrt().item(),
            "noise_leak": leak, "noise_leak_corr": leak_corr}


def measure(teacher, bench: DigitsBench, steps: int, eta: float, guidance: float, one_step_t, real, mask,
            grid: Path | None = None) -> dict:
    images = {}

    def fn(prompts, seed):
        if steps == REFERENCE_STEPS and not lora.has_adapters(teacher.unet):
            x = bench.reference(seed)
        else:
            with torch.no_grad(), lora.fused(teacher.unet):
                x = teacher.decode(sample_prompts(teacher, prompts, steps, guidance=guidance, eta=eta, seed=seed,
                                                  one_step_t=one_step_t))
        images[seed] = x
        return x

    scored = bench.score(fn)
    if grid is not None:
        grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images[bench.seeds[0]][:100], grid)
    out = {k: scored[k]["mean"] for k in ("fd", "acc", "traj_mse")}
    return out | pixel_stats(torch.cat(list(images.values())), real, mask)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", action="append", default=[], help="a LoRA file (repeatable)")
    p.add_argument("--steps", default="1,2,4,8", help="the LoRAs' step counts")
    p.add_argument("--etas", default="0", help="etas for k > 1")
    p.add_argument("--teacher-steps", default="40", help="teacher DDIM step counts ('' for none)")
    p.add_argument("--n", type=int, default=1000, help="samples (1000: the cached 40-step reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", action="store_true", help="the one-step ε-amplification split")
    p.add_argument("--one-step-t", type=int, default=None,
                   help="start the LoRAs' one-step samples at this timestep instead of the one they record")
    p.add_argument("--grids", default=None, help="a folder for each LoRA row's first 100 samples as a PNG grid")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    teacher = DigitsTeacher.load()
    bench = DigitsBench(teacher, n=a.n, seeds=(a.seed,), progress=False)
    real = data.load("test")[0]
    mask = background_mask(real)
    base = pixel_stats(real, real, mask)
    print(f"background: {int(mask.sum())} of 64 pixels; real test digits bg {base['bg']:.4f}, "
          f"bg>{SPECKLE} {base['bg_speck']:.4f}")
    rows = []
    ref40 = measure(teacher, bench, REFERENCE_STEPS, 0.0, bench.guidance, None, real, mask)
    for k in ints(a.teacher_steps):
        r = ref40 if k == REFERENCE_STEPS else measure(teacher, bench, k, 0.0, bench.guidance, None, real, mask)
        rows.append({"model": "teacher", "steps": k, "eta": 0.0, **r})
        if a.eps and k == 1:
            rows[-1]["eps"] = eps_split(teacher, bench, a.seed, bench.guidance, None, mask)
    for path in a.lora:
        meta = lora.load_lora(teacher.unet, path)
        guidance, one_step_t = meta.get("guidance", 1.0), a.one_step_t or meta.get("one_step_t")
        name = Path(path).parent.name + (f"@{one_step_t}" if one_step_t else "")
        for k in ints(a.steps):
            for eta in ([0.0] if k == 1 else [float(e) for e in a.etas.split(",")]):
                grid = Path(a.grids) / f"{name}-{k}step-eta{eta:g}.png" if a.grids else None
                r = measure(teacher, bench, k, eta, guidance, one_step_t, real, mask, grid)
                rows.append({"model": name, "steps": k, "eta": eta, **r})
                if a.eps and k == 1:
                    rows[-1]["eps"] = eps_split(teacher, bench, a.seed, guidance, one_step_t, mask)
        lora.remove_lora(teacher.unet, lora.STUDENT)
    print(f"{'model':<12} {'k':>2} {'eta':>4} {'fd':>7} {'×fd':>5} {'acc':>6} {'pfd':>7} {'×pfd':>5} "
          f"{'bg':>7} {'×bg':>5} {'bg>.1':>6} {'traj':>7}")
    bg0 = base["bg"]
    for r in rows:
        xbg = (r["bg"] - bg0) / max(ref40["bg"] - bg0, 1e-9)
        print(f"{r['model']:<12} {r['steps']:>2} {r['eta']:>4g} {r['fd']:7.2f} {r['fd'] / ref40['fd']:5.2f} "
              f"{r['acc']:6.3f} {r['pfd']:7.3f} {r['pfd'] / ref40['pfd']:5.2f} {r['bg']:7.4f} {xbg:5.1f} "
              f"{r['bg_speck']:6.3f} {r['traj_mse']:7.4f}")
        if "eps" in r:
            e = r["eps"]
            print(f"    one step at t={e['t']} (x0 = {e['amp']:.1f} × ε error): ε RMS error bg {e['eps_rms_bg']:.4f} "
                  f"digit {e['eps_rms_digit']:.4f}; x0 RMS error bg {e['x0_rms_bg']:.4f} digit "
                  f"{e['x0_rms_digit']:.4f}; x0 bias on bg {e['x0_bias_bg']:+.4f}; unclamped x0 RMS error bg "
                  f"{e['raw_rms_bg']:.4f}, of it x_T leaking through: slope {e['noise_leak']:+.4f} "
                  f"(corr {e['noise_leak_corr']:+.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps({"real": base, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
