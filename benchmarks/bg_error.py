"""What the one-step background error is made of: a bias, or an error that varies with the noise.

For the teacher's 40-step DDIM and each LoRA's one step (at its recorded one_step_t), --per
samples of each of the 10 prompts from one noise seed. On the background pixels (dark in at least
95% of the real test digits, as benchmarks/speckle.py) it prints the brightness (0..1, clamped as
shown), the share of pixels above 0.05, the raw x0's offset from black before the clamp (its mean:
a bias; its RMS: the whole error, split into a systematic part, each prompt's mean per pixel, and
a part over the noise, each prompt's spread per pixel), the std over the noise of each prompt's
shown pixels (what varies with the noise for a fixed prompt) and the correlation of the raw
offset with the noise pixel itself (input noise left uncancelled). Nothing is fitted on the train
split.

  python benchmarks/bg_error.py runs/distill/lora.safetensors [more LoRAs] [--per 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hypersd import lora
from hypersd.core.sampling import guided, sample_tcd
from hypersd.core.solver import denoise
from hypersd.digits import data
from hypersd.teachers.digits import DigitsTeacher

sys.path.insert(0, str(Path(__file__).parent))
from speckle import background_mask  # noqa: E402


def split(x: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict:
    """The background error of samples ``x`` (in [-1, 1], unclamped) drawn from ``noise``."""
    raw = x[:, 0][:, mask] + 1  # offset from black
    shown = raw.clamp(0, 2) / 2
    per = [raw[labels == c] for c in labels.unique()]  # each prompt's samples
    within = torch.stack([r.clamp(0, 2).div(2).std(0) for r in per]).mean()
    pair = torch.stack([raw.flatten(), noise[:, 0][:, mask].flatten()])
    # raw RMS² = (per prompt and pixel, the mean over the noise)² + the variance over the noise:
    # a fixed grey a prompt always has at a pixel, against an error each noise draws anew
    systematic = torch.stack([r.mean(0) for r in per]).pow(2).mean().sqrt()
    noise_rms = torch.stack([r.var(0, unbiased=False) for r in per]).mean().sqrt()
    return {"bg": shown.mean().item(), "above_0.05": (shown > 0.05).float().mean().item(),
            "raw_mean": raw.mean().item(), "raw_rms": raw.pow(2).mean().sqrt().item(),
            "systematic_rms": systematic.item(), "noise_rms": noise_rms.item(),
            "within_prompt_std": within.item(), "corr_noise": torch.corrcoef(pair)[0, 1].item()}


def line(name: str, r: dict) -> str:
    return (f"{name:>28}: bg {r['bg']:.4f}  above 0.05 {r['above_0.05']:.3f}  raw offset mean "
            f"{r['raw_mean']:+.4f} rms {r['raw_rms']:.4f} (systematic {r['systematic_rms']:.4f}, over the noise "
            f"{r['noise_rms']:.4f})  within-prompt std {r['within_prompt_std']:.4f}  "
            f"corr with noise {r['corr_noise']:+.3f}")


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("loras", nargs="*")
    p.add_argument("--per", type=int, default=200, help="samples per prompt")
    a = p.parse_args(argv)
    teacher = DigitsTeacher.load()
    unet, sched = teacher.unet, teacher.schedule
    real, _ = data.load("test")
    mask = background_mask(real)
    labels = torch.arange(10).repeat_interleave(a.per)
    cond = teacher.encode_prompt(data.prompts_for(labels.tolist()))
    noise = torch.randn((len(labels), *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    x = sample_tcd(guided(teacher, cond, teacher.default_guidance), noise, sched.inference_timesteps(40), sched)
    print(line("teacher, 40 DDIM steps", split(x, noise, labels, mask)))
    for path in a.loras:
        meta = lora.load_lora(unet, path)
        lora.activate(unet, lora.STUDENT)
        t = int(meta.get("one_step_t", teacher.T - 1))
        x = denoise(lambda x_t, s: teacher.eps(x_t, s, cond), noise, t, sched)
        print(line(f"{Path(path).parent.name} 1 step @{t}", split(x, noise, labels, mask)))
        lora.remove_lora(unet, lora.STUDENT)


if __name__ == "__main__":
    main()
