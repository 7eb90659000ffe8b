"""The adversarial term: the frozen teacher UNet's encoder as a discriminator backbone.

Backbone: conv_in, the down blocks and the mid block, with the teacher's timestep embedding and
cross-attention on the prompt (adapters off). Small trainable heads read several feature levels.
Hinge loss; fake = the student's jump, real = the EMA target, both at t_end.
"""

from __future__ import annotations

import torch
from torch import nn

from . import lora
from .errors import HypersdError
from .teachers.base import Cond


def encoder_features(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> list[torch.Tensor]:
    """The UNet's down path, returning the output of each down block and of the mid block."""
    t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
    x = x.to(unet.dtype)  # the samples are float32; the frozen encoder reads them in its own dtype
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    if cond.added:  # SDXL: pooled text and size/crop ids join the timestep embedding
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.hidden, added_cond_kwargs=cond.added)
        emb = emb + aug if aug is not None else emb
    h = unet.conv_in(x)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(h, temb=emb, encoder_hidden_states=cond.hidden)
        else:
            h, _ = block(h, temb=emb)
        feats.append(h)
    feats.append(unet.mid_block(h, emb, encoder_hidden_states=cond.hidden))
    return feats


class DiscriminatorHeads(nn.Module):
    """One small conv head per feature level; the logit is the sum of their spatial means."""

    def __init__(self, channels: list[int], hidden: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden),
                          nn.SiLU(), nn.Conv2d(hidden, 1, 1))
            for c in channels
        )

    @classmethod
    def for_unet(cls, unet, hidden: int = 64) -> "DiscriminatorHeads":
        if "block_out_channels" not in unet.config:  # a transformer teacher (digits-flow) has no down path
            raise HypersdError(f"adv_weight needs a UNet teacher (its encoder is the discriminator's backbone); "
                               f"this teacher is a {type(unet).__name__}: set adv_weight: 0")
        boc = list(unet.config.block_out_channels)
        return cls(boc + [boc[-1]], hidden)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return sum(h(f).float().mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats))


class Discriminator:
    """Backbone (frozen teacher encoder) + trainable heads; one call gives one logit per sample."""

    def __init__(self, unet, heads: DiscriminatorHeads):
        self.unet, self.heads = unet, heads

    def __call__(self, x, t, cond: Cond) -> torch.Tensor:
        with lora.adapters_disabled(self.unet):
            return self.heads(encoder_features(self.unet, x, t.clamp(min=0), cond))


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """E[max(0, 1 − D(real))] + E[max(0, 1 + D(fake))]."""
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−E[D(fake)]."""
    return -fake_logits.mean()
