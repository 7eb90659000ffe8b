"""The LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor).

CLIP ViT-L/14 image embedding, L2-normalised, through the MLP head of
``sac+logos+ava1-l14-linearMSE.pth``; the score is on the AVA 1-10 scale (SD1.5 ≈ 5.3).
The prompt is not used. The head must be converted to safetensors once (see the error message).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hypersd.rewards.base import Reward, load_model, model_source
from hypersd.rewards.clip import load_processor, pooled
from hypersd.rewards.head import MLPHead, head_file, load_head

ORIGINAL = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticScore(Reward):
    name = "aesthetic"
    default_path = "openai/clip-vit-large-patch14"  # the CLIP the head was trained on

    def __init__(self, clip, preprocess, head: MLPHead):
        super().__init__()
        self.clip, self.preprocess, self.head = clip, preprocess, head
        self.requires_grad_(False).eval()

    @classmethod
    def load(cls, path: str | None = None, head: str | None = None, processor: str | None = None) -> "AestheticScore":
        """``path``: the CLIP (folder or hub id); ``head``: the converted head .safetensors."""
        # The whole CLIPModel, not CLIPVisionModelWithProjection: from a CLIPModel folder that class
        # misses the top-level projection_dim and silently re-initialises the projection.
        from transformers import CLIPModel

        source = model_source(path or cls.default_path, cls.name, "a transformers CLIP ViT-L/14")
        head_file(head, cls.name, ORIGINAL)  # a missing head should fail before 1.7 GB of CLIP loads
        clip = load_model(CLIPModel, source, cls.name, "the CLIP model")
        _, preprocess = load_processor(cls.name, model_source(processor, cls.name, "a CLIP processor")
                                       if processor else source, text=False)
        return cls(clip, preprocess, load_head(head, cls.name, ORIGINAL, clip.config.projection_dim))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.clip.device, self.clip.dtype)
        emb = pooled(self.clip.get_image_features(pixel_values=pixels))
        return self.head(F.normalize(emb.float(), dim=-1))
