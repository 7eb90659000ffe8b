"""Metrics of a sampler on the digits world: fd, acc, traj_mse, reward.

Each is computed per seed and reported as the mean over seeds with its spread (std), so that a
difference can be told from sampling noise.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

METRICS = ("fd", "acc", "traj_mse", "reward")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between two feature sets [n, d]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # near-singular product: nudge both, as FID does
            eps = 1e-6 * np.eye(a.shape[1])
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def judge_samples(images, labels, reference, judges, real_features) -> dict[str, float]:
    """One seed's metrics. ``reference``: the teacher's 40-step DDIM from the same noise."""
    images = images.clamp(-1, 1)
    feats, pred = judges.evaluate(images)
    with torch.no_grad():
        reward = judges.reward(images, labels).mean().item()
    return {
        "fd": frechet_distance(feats.numpy(), real_features),
        "acc": (pred == labels).float().mean().item(),
        "traj_mse": ((images - reference.clamp(-1, 1)) ** 2).mean().item(),
        "reward": reward,
    }


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n_seeds"}} over seeds."""
    out = {}
    for k in per_seed[0]:
        v = np.array([d[k] for d in per_seed], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v)}
    return out
