"""Where and how a run's steps execute: the device, mixed precision, and data-parallel processes.

Every optimizer step of every stage goes through ``Runtime.step``, so one place decides how a
loss becomes an update: backward (scaled under fp16), gradients averaged over processes, clipped,
applied, or refused on every process when not finite (``StepGuard``). Under ``accelerate launch``
each process draws its own batches; the averaged gradients keep every process's LoRA weights
identical, so no UNet is wrapped (its adapters switch freely).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from hypersd.device import resolve_device
from hypersd.errors import HypersdError

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepGuard:
    """Counts, per optimizer role, the steps refused for a non-finite loss or gradients, and stops
    the run once one role has had ``limit`` of them in a row: a NaN stepped into one set of weights
    (and all-reduced to every process) would make every later loss NaN, and a run that only skips
    would end "successfully" having learned nothing.

    ``counts`` is the dict refused steps are tallied into (the trainer hands in the stage's stats);
    ``stage`` and ``step`` say where the run is, for the message."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.in_a_row: dict[str, int] = {}
        self.stage, self.step = "", ""

    def at(self, stage: str, step, counts: dict | None = None) -> None:
        self.stage, self.step = stage, step
        if counts is not None:
            self.counts = counts

    def record(self, role: str, ok: bool) -> None:
        if ok:
            self.in_a_row[role] = 0
            return
        self.counts[role] = self.counts.get(role, 0) + 1
        self.in_a_row[role] = n = self.in_a_row.get(role, 0) + 1
        if n >= self.limit:
            # another optimizer's blow-up (a fake score's, say) makes the student's losses NaN: name every suspect
            counts = ", ".join(f"{r} {k}" for r, k in self.counts.items())
            rates = " or ".join(dict.fromkeys(LR_KEYS.get(r, "lr") for r in self.counts))
            raise HypersdError(
                f"stage {self.stage!r}, step {self.step}: the {role} optimizer's last {n} steps had a non-finite "
                f"loss or gradients (each skipped: nothing was learned from them), so training stopped "
                f"(max_bad_steps: {self.limit}; refused in this stage: {counts}). The checkpoints written before "
                f"hold finite weights: lower the stage's {rates}, or grad_clip (under fp16: try bf16), then run "
                f"again with --resume")


RANK_SEED = 1_000_003  # process r of a data-parallel run draws from seed + r·RANK_SEED
SHARED_SEED = 2_000_003  # the stream every process of a run shares draws from seed + SHARED_SEED


def run_streams(seed: int, rank: int, world: int) -> tuple[torch.Generator, torch.Generator | None]:
    """Process ``rank``'s own stream (its batches and noise: data parallel wants them apart) and the
    stream of the draws that decide how many network calls a step makes and which branch it takes
    (a sampler's step count, where the generator starts): the same seed on every process, so every
    process draws the same. On a sharded base each call all-gathers, and processes that called
    differently would hang. One process: None, those draws come from its own stream as they always did."""
    own = torch.Generator().manual_seed(seed + RANK_SEED * rank)
    return own, (torch.Generator().manual_seed(seed + SHARED_SEED) if world > 1 else None)


class RandomStreams:
    """A run's random streams, as one checkpoint piece: each process's own data and noise
    generator, the stream the processes share (``run_streams``), and torch's global RNG (new LoRA
    and head weights, dropout).

    ``state_dict`` is collective (every process hands in its generator's state). On a resume
    with as many processes, each gets its own stream back; on another number, process 0 goes on
    and the others start new streams, seeded by ``step`` (the step resumed at). torch's state is
    only kept by ``load_state_dict``: the trainer puts it back with ``resume_torch`` once a
    resumed stage is built (building draws from it). The shared stream is the same on every
    process, saved once; a checkpoint without one (one process wrote it) seeds it by ``step``."""

    def __init__(self, generator: torch.Generator, rt: Runtime, seed: int, shared: torch.Generator | None = None):
        self.generator, self.rt, self.seed, self.shared = generator, rt, seed, shared
        self.step = 0
        self.torch_state: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        streams = self.rt.gather(self.generator.get_state())
        state = {"generator": streams[0], "torch": torch.get_rng_state()}
        if len(streams) > 1:
            state |= {f"process-{r}": stream.clone() for r, stream in enumerate(streams)}
        if self.shared is not None:
            state["shared"] = self.shared.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        streams = [state[f"process-{r}"] for r in range(len(state)) if f"process-{r}" in state] or [state["generator"]]
        rank = self.rt.rank
        if len(streams) == self.rt.world:
            self.generator.set_state(streams[rank])
        else:
            self.generator.set_state(streams[0])
            if rank:
                self.generator.manual_seed(self.seed + RANK_SEED * rank + self.step)
        if self.shared is not None:
            if "shared" in state:
                self.shared.set_state(state["shared"])
            else:
                self.shared.manual_seed(self.seed + SHARED_SEED + self.step)
        self.torch_state = state["torch"]

    def resume_torch(self) -> None:
        torch.set_rng_state(self.torch_state)


LR_KEYS = {"student": "lr", "fake": "fake_lr", "discriminator": "d_lr"}  # the recipe key of each role's rate


def leave_process_group(clean: bool) -> None:
    """End this process's part in the data-parallel process group, if it joined one.

    A process that exits with its gloo group alive can abort (SIGABRT, "terminate called without
    an active exception"; pytorch/pytorch#190489): a gloo worker thread still freeing a finished
    collective's tensors while the interpreter is torn down. Destroying the group joins its threads
    first.

    ``clean``: the run ended on every process. A barrier first, so no process leaves while another
    still talks to it (process 0 writes the LoRA and grids after the others are done); then the
    group is destroyed. After an error there is no barrier (the others may be in any collective,
    or never reach one): a gloo group is destroyed at once, which is local (hypersd's collectives
    are synchronous, so none is pending here) and closes its connections, so the others' next
    collective fails at once rather than waiting out the timeout. An NCCL group is left as it is
    (its destruction may wait on communicators the others never complete); the launcher ends the
    other processes once this one exits with an error."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()  # raising, it leaves the group to the error path
        dist.destroy_process_group()
    elif dist.get_backend() == "gloo":
        dist.destroy_process_group()


@dataclass
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "no"
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise HypersdError(f"unknown mixed_precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        self._scalers: dict[str, torch.amp.GradScaler] = {}
        self.guard = StepGuard()

    @classmethod
    def create(cls, device: str = "auto", precision: str = "no") -> Runtime:
        """One process, or this process of an ``accelerate launch`` (WORLD_SIZE set by the launcher)."""
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            # hypersd never hands its network to accelerate's FSDP (adapters switch within a step): it shards itself
            raise HypersdError("hypersd does not run under accelerate's FSDP config (it would shard nothing). Launch "
                               "with accelerate launch --multi_gpu (hypersd's data parallel) and set shard_base: true "
                               "to shard the frozen base over the processes, or quantize_base (int8, fp8, nf4) to "
                               "fit it on each card (docs/MEMORY.md)")
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
        return self.everywhere(math.isfinite(loss.item()))

    def everywhere(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process: a decision they all then take alike."""
        if self.world == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def most(self, n: int) -> int:
        """The largest ``n`` of any process: a count of network calls they all then make."""
        if self.world == 1:
            return n
        count = torch.tensor([n], device=self.device, dtype=torch.int64)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item())

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params, clip: float | None = None,
             role: str = "student") -> torch.Tensor | None:
        """backward → average over processes → (unscale) → clip → update; ``opt.zero_grad`` is the caller's.

        Returns the gradients' total norm before clipping (inf where an fp16 scaler overflowed).
        None, with nothing changed, when the loss or the averaged gradients are not finite on some
        process: refused on every process alike and counted under ``role`` (``guard``). Under fp16
        the GradScaler checks the scaled gradients itself: an inf there with a finite loss means the
        scale is too high, so the scaler skips the update and lowers the scale. That is not counted
        as a bad step while the scale is >= 1 (it happens by design in a healthy run's first steps,
        while the scale falls from 65536 to one that fits); below 1 no lower scale helps, the
        gradients themselves overflow, and it counts. A non-finite loss counts, as in float32 and bf16."""
        params = list(params)
        if not self.finite(loss):  # before backward: every process has the same answer, and no scaler state moves
            self.guard.record(role, False)
            return None
        scaler = self._scaler(role)
        with torch.autocast(self.device.type, enabled=False):  # backward runs in the dtypes forward chose
            (scaler.scale(loss) if scaler else loss).backward()
        self.average(params)  # before any check: every process then sees the same gradients and decides alike
        if scaler:
            scaler.unscale_(opt)
        # the total norm, which clipping computes anyway (an infinite limit measures and scales
        # nothing), is finite exactly when every gradient is
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf).detach()
        if scaler:
            scale = scaler.get_scale()
            scaler.step(opt)  # skips by itself on an inf/NaN in the gradients, and lowers the scale
            scaler.update()
            ok = scale >= 1 or scaler.get_scale() >= scale
            self.guard.record(role, ok)
            return norm if ok else None
        ok = math.isfinite(norm.item())
        self.guard.record(role, ok)
        if ok:
            opt.step()
        return norm if ok else None

    def _scaler(self, role: str):
        if self.precision != "fp16":
            return None
        if role not in self._scalers:  # one per optimizer: fake score and discriminator scale apart
            self._scalers[role] = torch.amp.GradScaler(self.device.type)
        return self._scalers[role]

    def scaler_states(self) -> dict[str, dict]:
        """Each fp16 GradScaler's state (scale, growth tracker), by optimizer role: plain floats and
        ints, so a checkpoint's ``optim.pt`` holds it and loads it with ``weights_only=True``."""
        return {role: s.state_dict() for role, s in self._scalers.items()}

    def load_scaler_states(self, states: dict[str, dict]) -> None:
        """Put back what ``scaler_states`` saved; none under bf16 or float32 (a run may resume in
        another precision: its scalers then start afresh)."""
        for role, state in states.items():
            scaler = self._scaler(role)
            if scaler is not None and state:
                scaler.load_state_dict(state)

    # the checkpoint protocol: a Runtime's state is its scalers'
    state_dict = scaler_states
    load_state_dict = load_scaler_states

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
