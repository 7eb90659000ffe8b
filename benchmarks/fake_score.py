"""Does DMD's fake score see the one-step speckle? The reading behind the low-noise t_range runs.

For a digits run folder (its final lora.safetensors and its last checkpoint's fake-score adapter,
lora-fake.safetensors), the generator's one-step samples x (at the LoRA's one_step_t) are noised to
each t, and both scores predict x0 from them. On the background pixels (dark in >= 95% of the real
test digits, as benchmarks/speckle.py) it prints the brightness of x, of the real score's x0 (the
teacher with CFG) and of the fake score's x0, and the slope of (x0_fake - x0_real) on
(x - x0_real): the share of the generator's specks the fake score keeps where the real score
removes them. DMD's gradient on a speck is that share of it. Beside it, the share a denoiser that
knew the specks' spread and saw each pixel alone would keep, s^2 / (s^2 + (sigma_t/alpha_t)^2), with
s the RMS of (x - x0_real) on the background: above t of about 20 the noise is larger than a speck.

  python benchmarks/fake_score.py runs/distill [--t 2,5,10,20,50,100,200,350,500] [--n 1000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hypersd import lora
from hypersd.core.sampling import guided
from hypersd.core.solver import denoise
from hypersd.digits import data
from hypersd.teachers.digits import DigitsTeacher
from hypersd.train.checkpoint import list_checkpoints

sys.path.insert(0, str(Path(__file__).parent))
from speckle import background_mask  # noqa: E402
from x0_background import brightness  # noqa: E402


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a digits run folder (hypersd distill --out)")
    p.add_argument("--t", default="2,5,10,20,50,100,200,350,500")
    p.add_argument("--n", type=int, default=1000)
    a = p.parse_args(argv)
    run = Path(a.run)
    checkpoints = list_checkpoints(run / "checkpoints")
    if not checkpoints or not (checkpoints[-1] / "lora-fake.safetensors").exists():
        raise SystemExit(f"{run}: no checkpoint with a fake-score adapter (lora-fake.safetensors); "
                         "give the folder of a run that ended in a DMD stage")
    teacher = DigitsTeacher.load()
    unet, sched = teacher.unet, teacher.schedule
    real, _ = data.load("test")
    mask = background_mask(real)
    meta = lora.load_lora(unet, str(run / "lora.safetensors"))
    fake = load_file(str(checkpoints[-1] / "lora-fake.safetensors"))
    rank = next(v.shape[0] for k, v in fake.items() if "lora_A" in k)
    # alpha = rank: the stage's own choice when the recipe sets no lora_alpha (the digits recipes)
    lora.ensure_lora(unet, lora.FAKE, rank, rank, lora.spec(unet, lora.STUDENT)["targets"])
    lora.set_state(unet, fake, lora.FAKE)

    g = torch.Generator().manual_seed(0)
    cond = teacher.encode_prompt(data.prompts_for((torch.arange(a.n) % 10).tolist()))
    t_gen = int(meta.get("one_step_t", teacher.T - 1))
    lora.activate(unet, lora.STUDENT)
    z = torch.randn((a.n, *teacher.latent_shape), generator=g)
    # unclamped, as the DMD stage hands them to both scores
    x = denoise(lambda x_t, t: teacher.eps(x_t, t, cond), z, t_gen, sched)
    acp = sched.alphas_cumprod
    print(f"{run}: one-step samples at t = {t_gen}, background {brightness(x, mask):.4f} "
          f"(real test digits {brightness(real, mask):.4f}); fake score from {checkpoints[-1].name}, rank {rank}")
    print(f"{'t':>4} {'sigma/alpha':>11} {'bg x0 real':>10} {'bg x0 fake':>10} {'kept by fake':>12} {'pixel-wise':>10}")
    for t in (int(v) for v in a.t.split(",")):
        x_t = sched.add_noise(x, torch.randn(x.shape, generator=g), torch.full((a.n,), t))
        with lora.adapters_disabled(unet):
            x0_real = denoise(guided(teacher, cond, teacher.default_guidance), x_t, t, sched)
        lora.activate(unet, lora.FAKE)
        x0_fake = denoise(lambda x_t, t: teacher.eps(x_t, t, cond), x_t, t, sched)
        d_x, d_f = ((v - x0_real)[:, 0][:, mask].flatten() for v in (x, x0_fake))
        kept = ((d_x * d_f).sum() / (d_x * d_x).sum()).item()
        s2, noise2 = d_x.pow(2).mean().item(), float((1 - acp[t]) / acp[t])
        print(f"{t:>4} {noise2 ** 0.5:>11.3f} {brightness(x0_real, mask):>10.4f} {brightness(x0_fake, mask):>10.4f} "
              f"{kept:>12.3f} {s2 / (s2 + noise2):>10.3f}", flush=True)


if __name__ == "__main__":
    main()
