"""Background brightness of the x0 a network predicts from real digits noised to t.

The last step of every k-step sampler returns the student's x0 from a low-noise x_t (t = 124 for
8 steps); this isolates that prediction from the sampler. For the teacher and each LoRA given, the
first --n real *test* digits are noised to each t (one fixed noise per t, seed 0), the network's x0
is read in one jump to the clean end (at the LoRA's recorded guidance; the teacher at its default),
and the mean brightness (0..1) of the background pixels (those dark in at least 95% of the real
test digits, as benchmarks/speckle.py) is printed per t. Nothing is fitted on the train split.

  python benchmarks/x0_background.py runs/distill/lora.safetensors [more LoRAs] [--t 24,49,124,249,499,799]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hypersd import lora
from hypersd.core.sampling import guided
from hypersd.core.schedule import CLEAN
from hypersd.digits import data
from hypersd.teachers.digits import DigitsTeacher

sys.path.insert(0, str(Path(__file__).parent))
from speckle import background_mask  # noqa: E402


def brightness(x: torch.Tensor, mask: torch.Tensor) -> float:
    return ((x.clamp(-1, 1)[:, 0][:, mask] + 1) / 2).mean().item()


@torch.no_grad()
def x0_row(teacher, real, prompts, noise, ts, w, mask) -> list[float]:
    sched, cond = teacher.schedule, teacher.encode_prompt(prompts)
    out = []
    with lora.fused(teacher.unet):
        f = guided(teacher, cond, w)
        for i, t in enumerate(ts):
            tt = torch.full((len(real),), t)
            x_t = sched.add_noise(real, noise[i], tt)
            out.append(brightness(sched.jump(x_t, f(x_t, tt), tt, torch.full_like(tt, CLEAN)), mask))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("loras", nargs="*", help="hypersd LoRA files")
    p.add_argument("--t", default="24,49,124,249,499,799")
    p.add_argument("--n", type=int, default=1000)
    a = p.parse_args(argv)
    ts = [int(t) for t in a.t.split(",")]
    teacher = DigitsTeacher.load()
    real, labels = data.load("test")
    mask = background_mask(real)
    real, prompts = real[:a.n], data.prompts_for(labels[:a.n].tolist())
    noise = torch.randn((len(ts), *real.shape), generator=torch.Generator().manual_seed(0))
    print(f"real test digits: background {brightness(real, mask):.4f}; x0 background at t = {ts}")
    with lora.adapters_disabled(teacher.unet):
        row = x0_row(teacher, real, prompts, noise, ts, teacher.default_guidance, mask)
    print(f"{'teacher':>24} " + " ".join(f"{v:.4f}" for v in row), flush=True)
    for path in a.loras:
        meta = lora.load_lora(teacher.unet, path)
        row = x0_row(teacher, real, prompts, noise, ts, meta.get("guidance", 1.0), mask)
        print(f"{Path(path).parent.name:>24} " + " ".join(f"{v:.4f}" for v in row), flush=True)
        lora.remove_lora(teacher.unet, lora.STUDENT)


if __name__ == "__main__":
    main()
