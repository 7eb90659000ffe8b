"""Metrics of a sampler on the digits world: fd, pix_fd, bg_noise, acc, traj_mse, reward.

Each is computed per seed and reported as the mean over seeds with its spread (std), so that a
difference can be told from sampling noise.

Two kinds of judge, neither fitted on anything the recipe trains on: ``fd`` on the held-out
evaluator CNN's features, and ``pix_fd`` / ``bg_noise`` on the pixels themselves, against the
real test split. The CNN learned to ignore faint noise (it was trained on noised digits) and so
is nearly blind to grey speckle on the background; the pixel judges see it.
"""

from __future__ import annotations

import numpy as np
import torch

from hypersd.eval.frechet import frechet_distance

METRICS = ("fd", "pix_fd", "bg_noise", "acc", "traj_mse", "reward")
# Lower is better; each is also reported as a multiple of the teacher's own 40-step value.
DISTANCES = ("fd", "pix_fd", "bg_noise")
DARK_SHARE = 0.9  # a pixel is background when at least this share of real test digits leave it black


class PixelJudge:
    """Judges on raw pixels of images in [-1, 1], fitted on real digits only (the test split).

    ``pix_fd``: the Fréchet distance between the 64 pixel values of samples and of real digits.
    ``bg_noise``: the mean intensity (0 black, 1 white) of the pixels real digits leave black.
    """

    def __init__(self, real: torch.Tensor):
        real = real.clamp(-1, 1)
        self.real_pixels = real.flatten(1).double().numpy()
        self.dark = (real <= -1).double().mean(0) >= DARK_SHARE
        if not self.dark.any():
            raise ValueError("the real images have no background pixels to measure noise on")

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        images = images.clamp(-1, 1)
        return {"pix_fd": frechet_distance(images.flatten(1).double().numpy(), self.real_pixels),
                "bg_noise": images.add(1).div(2)[:, self.dark].mean().item()}


def judge_images(images, labels, judges, real_features, pixels: PixelJudge) -> dict[str, float]:
    """The metrics that need no reference: fd, the pixel judges, acc, reward."""
    images = images.clamp(-1, 1)
    feats, pred = judges.evaluate(images)
    with torch.no_grad():
        reward = judges.reward(images, labels).mean().item()
    return {"fd": frechet_distance(feats.numpy(), real_features), **pixels(images),
            "acc": (pred == labels).float().mean().item(), "reward": reward}


def judge_samples(images, labels, reference, judges, real_features, pixels: PixelJudge) -> dict[str, float]:
    """One seed's metrics. ``reference``: the teacher's 40-step DDIM from the same noise."""
    out = judge_images(images, labels, judges, real_features, pixels)
    out["traj_mse"] = ((images.clamp(-1, 1) - reference.clamp(-1, 1)) ** 2).mean().item()
    return {k: out[k] for k in METRICS}


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n_seeds"}} over seeds."""
    out = {}
    for k in per_seed[0]:
        v = np.array([d[k] for d in per_seed], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v)}
    return out


def multiples(row: dict, reference: dict) -> dict[str, float]:
    """Each distance of a table row as a multiple of the reference row's (the teacher's 40 steps)."""
    return {m: row[m]["mean"] / reference[m]["mean"] for m in DISTANCES
            if m in row and m in reference and reference[m]["mean"] > 0}


def _spread(a: dict, b: dict, m: str) -> float:
    return a[m]["std"] + b[m]["std"]


def worse_on(a: dict, b: dict) -> list[str]:
    """The judges on which row ``a`` is worse than row ``b`` beyond the two seed spreads together."""
    out = [m for m in DISTANCES if a[m]["mean"] - b[m]["mean"] > _spread(a, b, m)]
    return out + (["acc"] if b["acc"]["mean"] - a["acc"]["mean"] > _spread(a, b, "acc") else [])


def beats(a: dict, b: dict) -> tuple[bool, list[str]]:
    """Whether row ``a`` is better than row ``b`` on every judge beyond the seed spread: each
    distance lower by more than the two spreads together, and acc not worse beyond them (it is
    near 1 for both). Returns the verdict and the judges on which ``a`` is not better."""
    short = [m for m in DISTANCES if not b[m]["mean"] - a[m]["mean"] > _spread(a, b, m)]
    short += [m for m in worse_on(a, b) if m == "acc"]
    return not short, short
