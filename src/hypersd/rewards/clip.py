"""CLIP score, and the CLIP-family loader that PickScore, HPSv2 and the aesthetic predictor share.

CLIP score is computed as torchmetrics' ``CLIPScore``: 100 * cos(image_embeds, text_embeds),
floored at 0 (so an image below 0 gets no gradient, as the metric gives it no credit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hypersd.rewards.base import Reward, load_model, load_part, model_source
from hypersd.rewards.preprocess import ImagePreprocess


def pooled(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output object in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_processor(reward: str, source: str, text: bool = True):
    """(tokenizer or None, ImagePreprocess) from a processor folder or hub id."""
    from transformers import AutoImageProcessor, AutoTokenizer

    fix = "pass processor= a folder or hub id with the tokenizer and preprocessor_config.json"
    tokenizer = load_part(AutoTokenizer.from_pretrained, source, reward, "the tokenizer", fix) if text else None
    image_proc = load_part(AutoImageProcessor.from_pretrained, source, reward, "the image processor", fix)
    return tokenizer, ImagePreprocess.from_processor(image_proc)


class ClipScore(Reward):
    name = "clip"
    default_path = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIPScore model
    default_processor = None  # None: the processor is read from the model's own folder

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess):
        super().__init__()
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.requires_grad_(False).eval()

    @classmethod
    def load(cls, path: str | None = None, processor: str | None = None) -> "ClipScore":
        """``path``: a transformers CLIPModel folder or hub id; ``processor``: where the tokenizer
        and image processor live, if not in ``path``."""
        from transformers import CLIPModel

        if path is None:
            path, processor = cls.default_path, processor or cls.default_processor
        source = model_source(path, cls.name, "a transformers CLIPModel")
        proc_source = model_source(processor, cls.name, "a CLIP processor") if processor else source
        model = load_model(CLIPModel, source, cls.name, "the CLIP model")
        return cls(model, *load_processor(cls.name, proc_source))

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.model.device, self.model.dtype)
        return F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()  # prompts are data, not something the loss can change
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        limit = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = {k: v.to(self.model.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(pooled(self.model.get_text_features(**tokens)).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return self.from_cosine(cos)

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return (100 * cos).clamp(min=0)
