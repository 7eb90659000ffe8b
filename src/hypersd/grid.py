"""A PNG grid of samples, so a person can look at what a run made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .outputs import atomic_path


def save_grid(images: torch.Tensor, path: str | Path, ncol: int = 10, scale: int = 4, max_images: int = 100) -> Path:
    """images [N, C, H, W] in [-1, 1] to a grid PNG (first ``max_images``)."""
    x = images[:max_images].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = x.shape
    nrow = (n + ncol - 1) // ncol
    canvas = np.zeros((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
