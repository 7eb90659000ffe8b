"""ImageReward (Xu et al. 2023), on transformers' BLIP modules.

The wiring is ImageReward's ``ImageReward.score``: the prompt tokenised by BLIP's BERT tokenizer
(max 35 tokens, [CLS] kept at position 0: ImageReward does not substitute BLIP's [ENC] token),
the image through BLIP's ViT (final LayerNorm included), the text encoder cross-attending to all
image tokens, its [CLS] output through the MLP head, then (r - MEAN) / STD.

transformers' ``BlipForImageTextRetrieval`` holds the same two towers (``vision_model`` is BLIP's
ViT, ``text_encoder`` is BLIP's med.py BertModel with cross-attention and no pooler), so the
released weights map onto it key for key; its projections and ITM head are not used and are
dropped. Parity is in the architecture and the wiring; it has not been checked numerically
against the released ImageReward-v1.0 here (no hub offline).

Converting ``ImageReward.pt`` (a pickle of BLIP_Pretrain + mlp) once, on a trusted machine:
map ``blip.visual_encoder.*`` / ``blip.text_encoder.*`` as transformers'
``convert_blip_original_pytorch_to_hf.py`` does into a BlipForImageTextRetrieval with a ViT-L
vision config (hidden 1024, 24 layers, 16 heads, patch 16, image 224, layer_norm_eps 1e-6) and
a text config with vocab 30524 (bert-base-uncased + [DEC] + [ENC]) and encoder_hidden_size 1024;
``save_pretrained`` it with that tokenizer and an image processor equal to ImageReward's
transform (shortest_edge 224, bicubic, center crop 224, OpenAI CLIP mean/std); pass the folder
as ``path``. Save ``mlp.*`` as the head .safetensors (the error message gives the command).
"""

from __future__ import annotations

import torch

from hypersd.rewards.base import Reward, load_model, model_source
from hypersd.rewards.clip import load_processor
from hypersd.rewards.head import MLPHead, head_file, load_head

MEAN = 0.16717362830052426  # ImageReward's reward statistics over its training set
STD = 1.0333394966054072
MAX_LENGTH = 35
ORIGINAL = "ImageReward.pt"


class ImageReward(Reward):
    name = "imagereward"

    def __init__(self, vision, text_encoder, tokenizer, preprocess, head: MLPHead, max_length: int = MAX_LENGTH):
        super().__init__()
        self.vision, self.text_encoder, self.tokenizer = vision, text_encoder, tokenizer
        self.preprocess, self.head, self.max_length = preprocess, head, max_length
        self.requires_grad_(False).eval()

    @classmethod
    def load(cls, path: str | None = None, head: str | None = None, processor: str | None = None,
             max_length: int = MAX_LENGTH) -> "ImageReward":
        """``path``: a converted transformers BLIP folder (see the module docstring);
        ``head``: the MLP head .safetensors (``layers.N.*`` or ``mlp.layers.N.*`` keys)."""
        from transformers import BlipForImageTextRetrieval

        source = model_source(path, cls.name, "a transformers BLIP folder converted from ImageReward.pt "
                                              "(see hypersd.rewards.imagereward)")
        head_file(head, cls.name, ORIGINAL, prefix="mlp.")
        blip = load_model(BlipForImageTextRetrieval, source, cls.name, "the BLIP model",
                          used=("vision_model.", "text_encoder."))
        tokenizer, preprocess = load_processor(cls.name, model_source(processor, cls.name, "a BLIP processor")
                                               if processor else source)
        mlp = load_head(head, cls.name, ORIGINAL, blip.config.text_config.hidden_size, prefix="mlp.")
        return cls(blip.vision_model, blip.text_encoder, tokenizer, preprocess, mlp, max_length)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = self.text_encoder.device
        pixels = self.preprocess(images).to(device, self.vision.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        out = self.text_encoder(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
        )
        cls_token = out.last_hidden_state[:, 0].float()
        return (self.head(cls_token) - MEAN) / STD
