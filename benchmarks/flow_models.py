"""SD3 / SD3.5 and FLUX.1 teachers of the released architectures with random weights, for the benchmarks.

The teacher classes are hypersd's own (``SD3Teacher``, ``FluxTeacher``: their schedules, packing,
guidance embedding), the transformer is built from its released config (``nets/archs.py``), and the
prompts are random embeddings of the real shapes, as a latent cache serves them (no text encoder runs
in a training step). ``tiny``: the same classes at a size a CPU runs in milliseconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers import AutoencoderKL

from hypersd.nets import archs, quant
from hypersd.teachers.base import Cond
from hypersd.teachers.flux import FluxTeacher
from hypersd.teachers.sd3 import SD3Teacher

SCHEDULERS = {"sd3": {"shift": 3.0}, "sd35-large": {"shift": 3.0},
              "flux": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                       "base_image_seq_len": 256, "max_image_seq_len": 4096}}
TINY = {"sd3": dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                    caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8),
        "flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))}
TINY["sd35-large"] = TINY["sd3"] | dict(qk_norm="rms_norm")
TINY_TEXT_TOKENS = 8
# the step's settings: SD3's inclusive grid on T = 841 takes 43 points, FLUX's trailing one 40
SOLVER_STEPS = {"sd3": 43, "sd35-large": 43, "flux": 40}


class _RandomPrompts:
    """Prompts as random embeddings of the shapes the transformer takes (what a latent cache holds)."""

    def encode_prompt(self, prompts) -> Cond:
        n, cfg = len(prompts), self.unet.config
        g = torch.Generator().manual_seed(len(prompts))
        hidden = torch.randn((n, self.text_tokens, cfg.joint_attention_dim), generator=g)
        pooled = torch.randn((n, cfg.pooled_projection_dim), generator=g)
        return Cond(hidden.to(self.device, self.dtype), {"pooled_projections": pooled.to(self.device, self.dtype)})


class RandomSD3(_RandomPrompts, SD3Teacher):
    pass


class RandomFlux(_RandomPrompts, FluxTeacher):
    pass


def _vae(device):
    # only its config is read in a training step (scale 8, 16 channels): four tiny levels
    with torch.device(device):
        return AutoencoderKL(**(archs.FLOW_VAE | dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                                      norm_num_groups=4))).requires_grad_(False)


def flow_teacher(name: str, device, dtype, tiny: bool = False, quantize: str = "none"):
    """A random-weight teacher of ``name`` (sd3, sd35-large, flux) on ``device``, its transformer's
    linear weights quantized as ``quantize`` says (in place on the device, layer by layer)."""
    torch.manual_seed(0)
    unet = archs.transformer(name, device=device, dtype=dtype, **(TINY[name] if tiny else {}))
    quant.quantize(unet, quantize, device, dtype=dtype)
    vae = _vae(device)
    sched = SCHEDULERS[name]
    _, text = archs.flow_tokens(name)
    text = TINY_TEXT_TOKENS if tiny else text
    if name == "flux":
        side = 64 if tiny else 1024
        t = RandomFlux(unet, vae, None, None, None, None, sched, resolution=side, max_sequence_length=text)
    else:
        t = RandomSD3(unet, vae, None, None, None, None, None, None, sched, max_sequence_length=text)
    t.text_tokens = text
    return t
