"""Losses on the image as it is shown: x0 clamped to the data range (``clip_aware`` stages).

A pixel-space teacher's decoder clamps x0 to [-1, 1], and most of a digit's pixels sit on the lower
bound. A squared error against a target on that bound is symmetric, so a student's small x0 errors
land half above it (a grey speck the user sees) and half below it (clamped away, unseen). Measured
on the image instead, a pixel already past the bound its target sits on costs nothing, and the
student may put its errors where the clamp hides them. A pixel past a bound its target is not on
is still pulled back, so no stroke is lost to the clamp.
"""

from __future__ import annotations

import torch


def shown_target(pred: torch.Tensor, tgt: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The target for ``pred`` that the shown image asks for: ``tgt`` clamped to [lo, hi], and
    ``pred`` itself (no gradient) where ``pred`` is already past the bound the clamped target is on."""
    tgt = tgt.clamp(lo, hi)
    past = ((pred <= lo) & (tgt <= lo)) | ((pred >= hi) & (tgt >= hi))
    return torch.where(past, pred.detach(), tgt)


def shown_rows(tgt: torch.Tensor, pred: torch.Tensor, clean: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``shown_target`` on the rows whose prediction is an image (``clean``: t_end at the clean end);
    the others (a segment boundary's noisy x) keep ``tgt``."""
    rows = clean.view(-1, *[1] * (tgt.dim() - 1))
    return torch.where(rows, shown_target(pred, tgt, lo, hi), tgt)
