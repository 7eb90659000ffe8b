"""The digits world's rectified-flow teacher: a small diffusers SD3Transformer2DModel on 8x8 pixels.

Beside the DDPM UNet (``teachers.digits``), so that every stage can be run on a flow teacher on a
CPU: x = (1−σ)·x0 + σ·ε, the network predicts v = ε − x0 (``FlowSchedule``). It shares the UNet
teacher's file format, text encoder and pixel codec (``DigitsWorldTeacher``).

- The schedule: shift 1 (no shift: the shift moves an image's noise level up for many tokens, and
  8x8 pixels are 16 tokens), "trailing" spacing on T = 1000, so σ_t = (t+1)/1000 and the DDPM
  recipe's numbers carry over: the solver grid of N = 40, the k = 1, 2, 4, 8 boundaries, a
  generator_t of 800 (σ = 0.801). The network is called with 1000·σ, as SD3's is.
- ``pooled_projections``: SD3 takes a pooled text vector besides the token states; here it is the
  mean of the encoder's token states over all ``MAX_WORDS`` positions (padding included: the empty
  prompt's pooled vector is then the mean of its padding states, a fixed learned vector, which is
  what CFG's unconditional branch needs). It is computed from ``Cond.hidden`` inside the network
  call, so a ``Cond`` carries the same tensors for both digits teachers.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from hypersd.core.noise import FlowSchedule
from hypersd.digits import ASSETS
from hypersd.errors import HypersdError
from hypersd.teachers.base import Cond, FlowScheduled
from hypersd.teachers.digits import DigitsWorldTeacher

DEFAULT_PATH = ASSETS / "teacher-flow.safetensors"

# 16 tokens of 2x2 pixels, 4 joint blocks of width 96: a forward+backward at batch 32 takes about
# 0.1 s on one CPU thread, against the UNet teacher's 0.15 s (patch 1 at width 64 took 0.15 s).
TRANSFORMER_CONFIG = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "attention_head_dim": 24,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,  # DigitTextEncoder's width
    "caption_projection_dim": 96,  # = heads x head dim, as SD3 has it
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 4,  # 8 / patch_size
}
FLOW_SCHEDULE_CONFIG = {"shift": 1.0, "timestep_scale": 1000.0, "spacing": "trailing", "T": 1000}
_SCHEDULE_KEYS = set(FLOW_SCHEDULE_CONFIG)


class FlowDigitsTeacher(FlowScheduled, DigitsWorldTeacher):
    KIND, LABEL, NET_KEY = "digits-flow-teacher", "digits flow teacher", "transformer"
    NET_CONFIG, SCHEDULE_CONFIG, DEFAULT_PATH = TRANSFORMER_CONFIG, FLOW_SCHEDULE_CONFIG, DEFAULT_PATH

    def _init_schedule(self) -> None:
        unknown = set(self.scheduler_config) - _SCHEDULE_KEYS
        if unknown:
            raise HypersdError(f"the digits flow teacher's schedule has unknown key(s) {sorted(unknown)}; "
                               f"it takes {', '.join(sorted(_SCHEDULE_KEYS))} (a FlowSchedule)")
        self._schedule = FlowSchedule(**self.scheduler_config)

    @classmethod
    def build_network(cls, config: dict) -> torch.nn.Module:
        return SD3Transformer2DModel(**config)

    @property
    def flow_config(self) -> dict:
        return self.scheduler_config  # the file's schedule is FlowSchedule's arguments

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity v = ε − x0 of whatever ``unet`` is now; named ``eps`` as the interface is.

        The transformer is called with ``model_timestep(t)`` = 1000·σ_t, not t. Dtypes as
        Teacher.eps: inputs in the network's dtype, the output in float32."""
        return self.unet(**self.network_inputs(x, t, cond)).sample.float()

    def network_inputs(self, x: torch.Tensor, t, cond: Cond) -> dict:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        hidden = self.network_cond(cond).hidden
        return {"hidden_states": x.to(self.dtype), "encoder_hidden_states": hidden,
                "pooled_projections": hidden.mean(1), "timestep": self._schedule.model_timestep(t).to(x.device)}
