"""Aspect-ratio buckets: non-square images trained at about the training area, one bucket a batch.

``make_buckets`` lists the (height, width) sizes, multiples of ``step`` pixels, of at most the
square's area and an aspect ratio within ``max_ratio``; ``nearest_bucket`` picks the one whose
aspect ratio is nearest an image's (in log ratio, so 2:1 and 1:2 are as far from 1:1). The cache
resizes each image to cover its bucket and crops the rest (``images.resize_and_crop``).

``BucketBatches`` draws the training batches: a bucket with probability in proportion to the items
it holds, then the batch from that bucket alone, shuffled without repeats. Every item's expected
count per batch is then ``n / N``, as with the square cache's uniform draw. A bucket with fewer
items than the batch fills it by going round its items again (each shuffled anew), so small
buckets are neither dropped nor oversampled. The draw reads only the generator it is handed: the
run's per-process stream, which the trainer checkpoints, so a resumed run draws what the
uninterrupted one drew, and each of N data-parallel processes draws its own batches (their
buckets differ step to step; the gradients' all-reduce does not care about the inputs' shapes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hypersd.errors import HypersdError

DEFAULT_STEP = 64  # pixels: the usual bucket step (SDXL's buckets, kohya's); the VAE's 8 x a UNet's 8
DEFAULT_MAX_RATIO = 2.0


def make_buckets(resolution: int, step: int = DEFAULT_STEP, max_ratio: float = DEFAULT_MAX_RATIO,
                 multiple: int = 1) -> list[tuple[int, int]]:
    """(height, width) buckets of about ``resolution``² pixels, sides multiples of ``step``, aspect
    ratios up to ``max_ratio``; ``multiple``: the pixels a side must be a multiple of for the model
    (VAE factor x the network's patch or down-sampling)."""
    if step < 1 or step % multiple:
        raise HypersdError(f"--bucket-step {step} must be a multiple of {multiple} pixels (the VAE's factor times "
                           f"the network's patch or down-sampling); 64 is the usual step")
    if resolution % step:
        raise HypersdError(f"--resolution {resolution} must be a multiple of --bucket-step {step}, so the square "
                           f"is one of the buckets")
    if max_ratio < 1:
        raise HypersdError(f"--bucket-max-ratio {max_ratio:g} must be at least 1 (1: the square alone)")
    area, out = resolution * resolution, set()
    for side in range(step, area // step + 1, step):
        other = area // side // step * step  # the longest side of a multiple of step within the area
        # from the shorter side only: its partner fills the area best (1280 to 768 would not)
        if side <= other and other / side <= max_ratio + 1e-9:
            out |= {(side, other), (other, side)}
    return sorted(out, key=lambda hw: (hw[1] / hw[0], hw))


def nearest_bucket(buckets: Sequence[tuple[int, int]], width: int, height: int) -> int:
    """The index of the bucket whose aspect ratio is nearest ``width / height`` (the larger on a tie)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), -buckets[i][0] * buckets[i][1]))


def bucket_name(size: Sequence[int]) -> str:
    """A bucket's name in a shard: the latents of its rows are the tensor ``latents-{H}x{W}``."""
    return f"latents-{size[0]}x{size[1]}"


class BucketBatches:
    """Batches of item indices, each from one bucket; ``groups[b]`` lists bucket b's items."""

    def __init__(self, groups: Sequence[Sequence[int]]):
        self.groups = [list(g) for g in groups if len(g)]
        if not self.groups:
            raise HypersdError("no bucket holds an item")
        self.weights = torch.tensor([len(g) for g in self.groups], dtype=torch.float64)

    def draw(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` items of one bucket, chosen by ``generator`` alone (see the module's notes)."""
        group = self.groups[int(torch.multinomial(self.weights, 1, generator=generator))]
        laps = -(-n // len(group))
        order = torch.cat([torch.randperm(len(group), generator=generator) for _ in range(laps)])[:n]
        return [group[i] for i in order.tolist()]


def latent_rule(teacher) -> tuple[int, int | None]:
    """(multiple, largest side) of the latents ``teacher``'s network takes: a UNet's down-sampling
    (each down block but the last halves), FLUX's 2x2 packing, SD3's patch; SD3's learned position
    table (``pos_embed_max_size`` patches a side) bounds a side, None where nothing does."""
    from hypersd.teachers.flux import FluxTeacher

    cfg = teacher.unet.config
    if isinstance(teacher, FluxTeacher):
        return 2 * int(cfg.get("patch_size", 1)), None
    if "block_out_channels" in cfg:
        return 2 ** (len(cfg.block_out_channels) - 1), None
    patch, table = int(cfg.get("patch_size", 1)), cfg.get("pos_embed_max_size")
    return patch, (int(table) * patch if table else None)


def check_buckets(teacher, sizes: Sequence[tuple[int, int]], where: str) -> None:
    """Refuse buckets the teacher's network cannot denoise, before anything is encoded or trained."""
    multiple, largest = latent_rule(teacher)
    factor = teacher.vae_scale_factor
    for h, w in sizes:
        if (h // factor) % multiple or (w // factor) % multiple or h % factor or w % factor:
            raise HypersdError(f"{where}: bucket {w}x{h} is not a multiple of {factor * multiple} pixels a side, "
                               f"which this model needs; cache with a --bucket-step that is")
        if largest is not None and max(h, w) // factor > largest:
            raise HypersdError(f"{where}: bucket {w}x{h} has a side of {max(h, w) // factor} latents, beyond the "
                               f"{largest} the transformer's position table (pos_embed_max_size) covers; cache "
                               f"with a smaller --bucket-max-ratio or --resolution")
