"""Where and how a run's steps execute: the device, mixed precision, and data-parallel processes.

Every optimizer step of every stage goes through ``Runtime.step``, so one place decides how a
loss becomes an update: backward (scaled under fp16), gradients averaged over processes, clipped,
applied. Under ``accelerate launch`` each process draws its own batches; the averaged gradients
keep every process's LoRA weights identical, so no UNet is wrapped (its adapters switch freely).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .errors import HypersdError

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HypersdError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HypersdError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device: cpu")
    return dev


@dataclass
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "no"
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise HypersdError(f"unknown mixed_precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        self._scalers: dict[int, torch.amp.GradScaler] = {}

    @classmethod
    def create(cls, device: str = "auto", precision: str = "no") -> "Runtime":
        """One process, or this process of an ``accelerate launch`` (WORLD_SIZE set by the launcher)."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            state = PartialState(cpu=device == "cpu")  # joins the process group the launcher set up
            return cls(state.device, precision, state.process_index, state.num_processes)
        return cls(resolve_device(device), precision)

    @property
    def dtype(self) -> torch.dtype | None:
        """The low-precision dtype of the frozen weights and autocast; None: float32 throughout."""
        return PRECISIONS[self.precision]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite: all skip a step together, or none does."""
        ok = math.isfinite(loss.item())
        if self.world == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params, clip: float | None = None) -> torch.Tensor:
        """backward → average over processes → (unscale) → clip → update; ``opt.zero_grad`` is the caller's.
        Returns the gradients' total norm before clipping (inf or NaN where fp16 overflowed)."""
        params = list(params)
        scaler = self._scaler(opt)
        with torch.autocast(self.device.type, enabled=False):  # backward runs in the dtypes forward chose
            (scaler.scale(loss) if scaler else loss).backward()
        self.average(params)  # before unscaling: every process then sees the same inf/NaN and skips alike
        if scaler:
            scaler.unscale_(opt)
        # an infinite limit measures the norm and scales nothing
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return norm.detach()

    def _scaler(self, opt):
        if self.precision != "fp16":
            return None
        if id(opt) not in self._scalers:  # one per optimizer: fake score and discriminator scale apart
            self._scalers[id(opt)] = torch.amp.GradScaler(self.device.type)
        return self._scalers[id(opt)]

    def average(self, params: list[torch.nn.Parameter]) -> None:
        """Gradients averaged over processes, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def gather(self, obj) -> list:
        """``obj`` from every process, in rank order (a list of one without processes)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def same_everywhere(self, params) -> bool:
        """Whether every process holds exactly these weights (a checksum of their bytes)."""
        if self.world == 1:
            return True
        total = torch.stack([p.detach().double().sum() + p.detach().double().abs().sum() for p in params]).sum()
        sums = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world)]
        torch.distributed.all_gather(sums, total.reshape(1).to(self.device))
        return all(torch.equal(s, sums[0]) for s in sums)
