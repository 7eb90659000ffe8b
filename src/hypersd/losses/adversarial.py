"""The adversarial term: the frozen teacher network's first half as a discriminator backbone.

Backbone, by the network's class (``FEATURES``), adapters off, called with exactly the inputs the
teacher's own call builds (``Teacher.network_inputs``: the model timestep, pooled text, ids):

- a UNet: conv_in, the down blocks and the mid block, with the timestep embedding and
  cross-attention on the prompt; the features are each down block's output and the mid block's.
- an SD3 / FLUX transformer (SD3's MMDiT, the digits flow teacher's too; FLUX's double-stream
  blocks): the embedders, then the joint blocks up to the middle one; the features are the
  image-token states after every other block (0, 2, ..., the middle), put back on the patch grid as
  [B, C, h, w] so the same small conv heads read them as they read a UNet's maps (a 3x3 conv
  sees neighbouring patches, which a token-wise head would not).

Small trainable heads read the feature levels, in float32. Hinge loss; fake = the student's jump,
real = the EMA target, both at t_end. DMD's GAN term (DMD2's) reads the same backbone with the fake
score's adapter on, under the non-saturating logistic loss.
"""

from __future__ import annotations

import torch
from diffusers import (
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch import nn

from hypersd import lora
from hypersd.errors import HypersdError
from hypersd.teachers.base import Cond


def unet_features(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=None) -> list[torch.Tensor]:
    """The UNet's down path, returning the output of each down block and of the mid block."""
    emb = unet.time_embedding(unet.time_proj(timestep).to(sample.dtype))
    if added_cond_kwargs:  # SDXL: pooled text and size/crop ids join the timestep embedding
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
    h = unet.conv_in(sample)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(h, temb=emb)
        feats.append(h)
    feats.append(unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states))
    return feats


def feature_blocks(n_blocks: int) -> list[int]:
    """The joint blocks whose image tokens are read: every other one from the first to the middle
    (SD3's last block updates no text tokens; it is never reached, as it lies past the middle)."""
    return list(range(0, n_blocks // 2 + 1, 2))


def _on_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h·w, C] row-major image tokens to [B, C, h, w]."""
    return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)


def _joint_blocks(net, hidden, context, temb, grid, **block_kwargs) -> list[torch.Tensor]:
    feats, last = [], feature_blocks(len(net.transformer_blocks))
    for i, block in enumerate(net.transformer_blocks[: last[-1] + 1]):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, **block_kwargs)
        if i in last:
            feats.append(_on_grid(hidden, *grid))
    return feats


def sd3_features(net, hidden_states, timestep, encoder_hidden_states, pooled_projections) -> list[torch.Tensor]:
    """SD3Transformer2DModel.forward's first half: patch and position embedding, the timestep and
    pooled-text embedding, the context projection, then the joint blocks."""
    p = net.config.patch_size
    grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
    hidden = net.pos_embed(hidden_states).contiguous()
    temb = net.time_text_embed(timestep, pooled_projections)
    return _joint_blocks(net, hidden, net.context_embedder(encoder_hidden_states), temb, grid)


def flux_features(net, hidden_states, timestep, encoder_hidden_states, pooled_projections, txt_ids, img_ids,
                  guidance=None) -> list[torch.Tensor]:
    """FluxTransformer2DModel.forward's first half: the token embedder, the timestep (and guidance)
    and pooled-text embedding, the context projection, the rotary embedding of the text and image
    ids, then the double-stream blocks. The patch grid is read off the image ids (row, column)."""
    grid = (int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1)
    hidden = net.x_embedder(hidden_states)
    timestep = timestep.to(hidden.dtype) * 1000  # as forward scales σ and the guidance
    if guidance is None:
        temb = net.time_text_embed(timestep, pooled_projections)
    else:
        temb = net.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
    rotary = net.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    return _joint_blocks(net, hidden, net.context_embedder(encoder_hidden_states), temb, grid,
                         image_rotary_emb=rotary)


# the one dispatch on the network's class: (features of its inputs, channels of each feature level)
FEATURES = {
    UNet2DConditionModel: (unet_features, lambda c: [*c.block_out_channels, c.block_out_channels[-1]]),
    SD3Transformer2DModel: (sd3_features, lambda c: [c.num_attention_heads * c.attention_head_dim]
                            * len(feature_blocks(c.num_layers))),
    FluxTransformer2DModel: (flux_features, lambda c: [c.num_attention_heads * c.attention_head_dim]
                             * len(feature_blocks(c.num_layers))),
}


def _backbone(net):
    for cls, entry in FEATURES.items():
        if isinstance(net, cls):
            return entry
    raise HypersdError(f"adv_weight has no discriminator backbone for a {type(net).__name__} teacher (it reads a "
                       f"UNet's, an SD3 or a FLUX transformer's first half); set adv_weight: 0")


def encoder_features(net, inputs: dict) -> list[torch.Tensor]:
    """The backbone's feature levels, in float32, for the network's own keyword inputs
    (``Teacher.network_inputs``, already in the network's dtype)."""
    from hypersd.nets.shard import unshard_root

    unshard_root(net)  # it calls the network's parts, not its forward, whose hook would gather them
    return [f.float() for f in _backbone(net)[0](net, **inputs)]


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
    def for_network(cls, net, hidden: int = 64) -> "DiscriminatorHeads":
        return cls(_backbone(net)[1](net.config), hidden)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return sum(h(f).float().mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats))


class Discriminator:
    """Backbone (the network's first half) + trainable heads; one call gives one logit per sample.

    ``role`` None: the frozen teacher's backbone, adapters off (TSCD's). Gradients flow through
    the backbone to x (the generator's loss) but reach none of its weights. A role (``nets.roles``):
    the backbone with that role's adapters active, whose trainable ones then take gradients too
    (DMD2's classifier on the fake score's features)."""

    def __init__(self, teacher, heads: DiscriminatorHeads, role=None):
        self.teacher, self.heads, self.role = teacher, heads, role

    def features(self, x, t, cond: Cond) -> list[torch.Tensor]:
        net = self.teacher.unet
        with lora.adapters_disabled(net) if self.role is None else self.role.running():
            return encoder_features(net, self.teacher.network_inputs(x, t.clamp(min=0), cond))

    def __call__(self, x, t, cond: Cond) -> torch.Tensor:
        return self.heads(self.features(x, t, cond))


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """E[max(0, 1 − D(real))] + E[max(0, 1 + D(fake))]."""
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−E[D(fake)]."""
    return -fake_logits.mean()


def logistic_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """E[softplus(−D(real))] + E[softplus(D(fake))]: DMD2's classifier loss (log 4 at D = 0)."""
    return torch.nn.functional.softplus(-real_logits).mean() + torch.nn.functional.softplus(fake_logits).mean()


def logistic_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """E[softplus(−D(fake))]: the non-saturating generator loss."""
    return torch.nn.functional.softplus(-fake_logits).mean()
