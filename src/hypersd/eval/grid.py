"""A PNG grid of samples, so a person can look at what a run made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypersd.outputs import atomic_path


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


def save_rows(blocks: list[tuple[str, torch.Tensor]], path: str | Path, ncol: int = 10, scale: int = 4,
              label_width: int = 96) -> Path:
    """Labelled blocks of samples one under another (images [N, 1, H, W] in [-1, 1], N a multiple
    of ``ncol``), so that samplers drawn from the same noise and prompts line up column by column."""
    from PIL import ImageDraw

    cells = []
    for label, images in blocks:
        x = images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()[:, 0]
        n, h, w = x.shape
        if n % ncol:
            raise ValueError(f"block {label!r} has {n} images, not a multiple of {ncol}")
        cells.append((label, x.reshape(n // ncol, ncol, h, w)))
    h, w = cells[0][1].shape[2:]
    cell_h, cell_w = (h + 1) * scale, (w + 1) * scale  # one dark pixel between images
    gap = 2 * scale  # between blocks: a clear break where the sampler changes
    rows = sum(len(c) for _, c in cells)
    canvas = Image.new("L", (label_width + ncol * cell_w, rows * cell_h + gap * (len(cells) - 1)), 0)
    draw, y = ImageDraw.Draw(canvas), 0
    for label, grid in cells:
        draw.text((4, y + 4), label, fill=255)
        for r in grid:
            for q, img in enumerate(r):
                tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
                canvas.paste(tile, (label_width + q * cell_w, y))
            y += cell_h
        y += gap
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
