"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

The released model is a transformers CLIPModel; its tokenizer and image processor are those of
the CLIP-H it started from, which is why ``processor`` defaults to a second hub id.
Score = logit_scale.exp() * cos(image, text), as in the authors' inference example.
"""

from __future__ import annotations

import torch

from hypersd.rewards.clip import ClipScore


class PickScore(ClipScore):
    name = "pickscore"
    default_path = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * cos
