"""HPSv2 (Wu et al. 2023): an OpenCLIP ViT-H/14 fine-tuned on human preference pairs.

The released ``HPS_v2_compressed.pt`` is an open_clip state dict (a pickle); hypersd does not
depend on open_clip and never unpickles downloads. Convert it once, on a trusted machine, to a
transformers CLIP folder: load it into open_clip's ViT-H-14, map the keys as transformers'
``convert_clip_original_pytorch_to_hf.py`` does (open_clip's ViT-H has OpenAI CLIP's layout;
``hidden_act`` is ``gelu``), and ``save_pretrained`` the CLIPModel together with the tokenizer and
image processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` into one folder; pass that folder
as ``path``. Score = cos(image, text), as HPSv2 reports it (e.g. 0.27), not ×100.
"""

from __future__ import annotations

import torch

from hypersd.errors import HypersdError
from hypersd.rewards.clip import ClipScore


class HPSv2(ClipScore):
    name = "hpsv2"
    default_path = None

    @classmethod
    def load(cls, path: str | None = None, processor: str | None = None) -> "HPSv2":
        if path is None:
            raise HypersdError("hpsv2 reward needs its weights: pass path=FOLDER, a transformers CLIP folder "
                               "converted from HPS_v2_compressed.pt (see hypersd.rewards.hpsv2)")
        return super().load(path, processor)

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return cos
