"""Training a digits teacher: plain denoising on the teacher's own schedule, with prompt dropout for CFG.

One loop for both families: x_t = schedule.add_noise(x0, ε, t) and the loss is the MSE between the
network's output and schedule.target(x0, ε, t): ε for the DDPM UNet, v = ε − x0 for the flow
transformer (the rectified-flow loss). t is drawn uniformly on the schedule's integer grid
{0..T-1} in both: for the flow teacher (shift 1, trailing) that is σ uniform on {0.001, ..., 1},
the grid every sampler and stage later evaluates the network on."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hypersd.digits import data
from hypersd.errors import HypersdError
from hypersd.teachers.digits import DigitsTeacher, DigitsWorldTeacher

FAMILIES = ("ddpm", "flow")


def teacher_class(family: str = "ddpm") -> type[DigitsWorldTeacher]:
    if family == "ddpm":
        return DigitsTeacher
    if family == "flow":
        from hypersd.teachers.digits_flow import FlowDigitsTeacher

        return FlowDigitsTeacher
    raise HypersdError(f"unknown teacher family {family!r}; choose one of {', '.join(FAMILIES)}")


def new_teacher(family: str = "ddpm", seed: int = 0) -> DigitsWorldTeacher:
    """A fresh, untrained digits teacher of ``family``."""
    return teacher_class(family).new(seed)


def train_teacher(
    out: str | Path,
    steps: int = 6000,
    minutes: float | None = None,
    batch: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    prompt_dropout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    family: str = "ddpm",
    save_every: int = 1000,
    teacher: DigitsWorldTeacher | None = None,
) -> DigitsWorldTeacher:
    """Train a fresh teacher of ``family`` for ``steps`` steps (or until ``minutes`` pass) and save
    its EMA every ``save_every`` steps and at the end. ``teacher``: start from this one instead."""
    torch.manual_seed(seed)
    teacher = teacher if teacher is not None else new_teacher(family, seed)
    for part in (teacher.unet, teacher.text):  # a loaded teacher comes frozen, in eval mode
        part.train().requires_grad_(True)
    x_all, y_all = data.load("train")
    prompts = data.prompts_for(range(10))
    params = list(teacher.unet.parameters()) + list(teacher.text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(teacher)  # the shipped weights: an EMA of the trained ones
    ema_params = list(ema.unet.parameters()) + list(ema.text.parameters())
    schedule = teacher.schedule
    deadline = time.monotonic() + 60 * minutes if minutes else None
    bar = tqdm(range(steps), desc="teacher", disable=not progress)
    for step in bar:
        # the cosine runs over whichever budget ends first, so a run cut by ``minutes`` still anneals
        done = step / steps if deadline is None else max(step / steps, 1 - (deadline - time.monotonic()) / (60 * minutes))
        lr_now = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr_now
        idx = torch.randint(0, len(x_all), (batch,))
        x0, y = x_all[idx], y_all[idx]
        # Prompt dropout: the empty prompt teaches the unconditional branch CFG needs.
        keep = torch.rand(batch) >= prompt_dropout
        texts = [prompts[int(c)] if k else "" for c, k in zip(y, keep)]
        cond = teacher.encode_prompt(texts)
        t = torch.randint(0, teacher.T, (batch,))
        noise = torch.randn_like(x0)
        pred = teacher.eps(schedule.add_noise(x0, noise, t), t, cond)
        loss = torch.nn.functional.mse_loss(pred, schedule.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % save_every == save_every - 1:
            _save(ema, out, step + 1, batch)
        if deadline and time.monotonic() > deadline:
            break
    _save(ema, out, step + 1, batch)
    return ema


def _save(ema: DigitsWorldTeacher, out, steps: int, batch: int) -> None:
    ema.info = {"steps": steps, "batch": batch, "t_sampling": "uniform on {0..T-1}"}
    ema.save(out)
