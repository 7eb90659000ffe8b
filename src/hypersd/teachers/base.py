"""The teacher interface: everything a distillation stage may ask of a teacher, and nothing more.

A teacher is a denoising network (a diffusers ``UNet2DConditionModel``) with its noise schedule,
its prompt encoder and its latent codec. The student is the same UNet with a LoRA enabled, so
``eps`` serves both; which one answers depends on the adapter state of ``unet``. What the network
outputs (ε, v, flow's v) is read only through ``schedule``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hypersd.core.noise import DDPMSchedule, FlowSchedule, NoiseSchedule
from hypersd.core.solver import cfg


@dataclass
class Cond:
    """Prompt conditioning for a batch: the UNet's keyword inputs besides x and t.

    ``hidden`` is ``encoder_hidden_states`` [B, L, D]; ``added`` holds SDXL's ``text_embeds``
    (pooled) and ``time_ids``, each with the batch first.
    """

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> "Cond":
        return Cond(fn(self.hidden), {k: fn(v) for k, v in self.added.items()})

    def __getitem__(self, idx) -> "Cond":
        return self._map(lambda v: v[idx])

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda v: v.to(*args, **kwargs))

    def repeat(self, n: int) -> "Cond":
        """Each row repeated n times in place (row i becomes rows i*n .. i*n+n-1)."""
        return self._map(lambda v: v.repeat_interleave(n, 0))

    def unconditional(self, uncond_row: "Cond") -> "Cond":
        """The unconditional rows for this batch: the empty prompt, with this batch's own
        micro-conditioning (SDXL's size/crop ids), as the SDXL pipeline pairs them."""
        rows = uncond_row.repeat(len(self))
        if "time_ids" in self.added:
            rows.added["time_ids"] = self.added["time_ids"]
        return rows

    def where(self, keep: torch.Tensor, other: Cond) -> Cond:
        """Row i of this batch where ``keep[i]``, else row i of ``other`` (a batch of the same size)."""
        def pick(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.to(mine.device).view(-1, *[1] * (mine.dim() - 1)), mine, theirs)

        return Cond(pick(self.hidden, other.hidden), {k: pick(v, other.added[k]) for k, v in self.added.items()})

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        first = conds[0]
        return Cond(
            torch.cat([c.hidden for c in conds]),
            {k: torch.cat([c.added[k] for c in conds]) for k in first.added},
        )


class Teacher:
    """Base class; backbones fill in the prompt encoder and the latent codec."""

    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor  # [T], float32, from the teacher's own scheduler config
    latent_shape: tuple[int, int, int]  # (C, H, W) of what the UNet denoises
    default_guidance: float = 7.5

    @property
    def T(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def prediction_type(self) -> str:
        """What the network's output is, as the teacher's own scheduler config says."""
        return getattr(self, "scheduler_config", {}).get("prediction_type", "epsilon")

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule every loss and sampler reads the network's output on (a new object
        per access: callers keep the one they use, with its per-device tables)."""
        return DDPMSchedule(self.alphas_cumprod, self.prediction_type)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # the first floating weight's: a 4-bit quantized one is stored as bytes (nets/quant.py)
        return next(p.dtype for p in self.unet.parameters() if p.is_floating_point())

    # -- prompts -------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def empty_cond(self, n: int) -> Cond:
        """The unconditional input for classifier-free guidance, n rows."""
        return self.encode_prompt([""]).repeat(n)

    # -- the network ---------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The raw output (ε, v: ``schedule.prediction_type``) of whatever ``unet`` is now (teacher,
        or student with adapters on), at timestep t in the schedule's units; the network itself is
        called with ``schedule.model_timestep(t)`` (t itself for DDPM, the scaled σ for flow).

        The one place where dtypes change: inputs go in as the network's dtype, the output comes out
        in float32, so every jump, noise addition, guidance mix and loss around it is float32."""
        return self.unet(**self.network_inputs(x, t, cond)).sample.float()

    def network_inputs(self, x: torch.Tensor, t, cond: Cond) -> dict:
        """The network's keyword inputs for (x, t, cond), as ``eps`` calls it: the one place that
        builds them, so that the discriminator's backbone reads exactly what the network reads."""
        t = self.schedule.model_timestep(torch.as_tensor(t, device=x.device)).expand(x.shape[0])
        cond = self.network_cond(cond)
        kwargs = {"added_cond_kwargs": cond.added} if cond.added else {}
        return {"sample": x.to(self.dtype), "timestep": t, "encoder_hidden_states": cond.hidden, **kwargs}

    def network_cond(self, cond: Cond) -> Cond:
        """The conditioning as the network takes it: embeddings in its dtype; SDXL's size/crop
        ``time_ids`` in float32 (the UNet embeds them sinusoidally in float32; bf16 would make
        1366 into 1368)."""
        dtype = self.dtype
        added = {k: v.float() if k == "time_ids" else v.to(dtype) for k, v in cond.added.items()}
        return Cond(cond.hidden.to(dtype), added)

    def eps_cfg(self, x, t, cond: Cond, uncond: Cond, w) -> torch.Tensor:
        """Guided ε in one batched call: conditional and unconditional rows together."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        both = self.eps(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([cond, uncond]))
        eps_c, eps_u = both.chunk(2)
        return cfg(eps_c, eps_u, w)

    # -- latents -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the latents the UNet denoises."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents back to images in [-1, 1]."""
        raise NotImplementedError


class FlowScheduled:
    """For a rectified-flow teacher: its schedule from ``flow_config`` (FlowSchedule's arguments),
    the one it calls its network on kept as ``_schedule`` (with its device tables)."""

    flow_config: dict
    _schedule: FlowSchedule

    @property
    def schedule(self) -> NoiseSchedule:
        # a fresh object per access, as Teacher.schedule: callers keep theirs with its device tables
        return FlowSchedule(**self.flow_config)

    @property
    def T(self) -> int:
        return self._schedule.T

    @property
    def prediction_type(self) -> str:
        return "flow"
