"""Prompt files, the images of a run (one file and seed each), and PNGs holding their settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hypersd.errors import HypersdError

if TYPE_CHECKING:  # annotations only: torch is imported where it runs
    import torch

    from hypersd.inference.generator import Generator


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise HypersdError(f"prompt file {path} not found; pass a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise HypersdError(f"prompt file {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise HypersdError(f"prompt file {path} holds no prompt; write one prompt per line")
    return prompts


@dataclass
class Job:
    """One image to make: its file, prompt and seed."""

    path: Path
    prompt: str
    seed: int


def plan_jobs(prompts: list[str], out_dir: str | Path, per_prompt: int = 1, seed: int = 0,
              force: bool = False) -> list[Job]:
    """Image j (prompt j // per_prompt) is ``out_dir/{j:05d}.png`` from seed ``seed + j``.

    Every file is checked before anything is generated: an existing one without ``force`` stops
    the run before it spends any time."""
    from hypersd.outputs import check_writable

    if per_prompt < 1:
        raise HypersdError(f"--per-prompt must be at least 1, got {per_prompt}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HypersdError(f"--out {out_dir} is a file; pass a folder for the images")
    jobs = [Job(out_dir / f"{j:05d}.png", p, seed + j)
            for j, p in enumerate(p for p in prompts for _ in range(per_prompt))]
    for job in jobs:
        check_writable(job.path, force)
    return jobs


def save_png(image: "torch.Tensor", path: str | Path, prompt: str, settings: dict) -> Path:
    """One image in [-1, 1] as a PNG with its prompt and settings in the PNG's text chunks
    (``prompt``; ``hypersd``: JSON of the plan and the seed); written atomically."""
    import numpy as np
    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from hypersd.outputs import atomic_path

    pixels = image.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    info = PngInfo()
    info.add_itxt("prompt", prompt)
    info.add_itxt("hypersd", json.dumps(settings))
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def run_jobs(gen: Generator, jobs: list[Job], batch_size: int = 4, progress: bool = True) -> list[Path]:
    """Generate and write every job, ``batch_size`` images per pipeline call."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise HypersdError(f"--batch-size must be at least 1, got {batch_size}")
    settings = asdict(gen.plan)
    written = []
    for i in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        batch = jobs[i:i + batch_size]
        images = gen.images([j.prompt for j in batch], [j.seed for j in batch])
        for job, image in zip(batch, images):
            written.append(save_png(image, job.path, job.prompt, {**settings, "seed": job.seed}))
    return written
