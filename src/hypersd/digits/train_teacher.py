"""Training the digits teacher: plain ε-prediction denoising with prompt dropout for CFG."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..teachers.digits import DigitsTeacher
from . import data


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
) -> DigitsTeacher:
    """Train a fresh teacher for ``steps`` steps (or until ``minutes`` pass) and save its EMA."""
    torch.manual_seed(seed)
    teacher = DigitsTeacher.new(seed)
    x_all, y_all = data.load("train")
    prompts = data.prompts_for(range(10))
    params = list(teacher.unet.parameters()) + list(teacher.text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(teacher)  # the shipped weights: an EMA of the trained ones
    ema_params = list(ema.unet.parameters()) + list(ema.text.parameters())
    sched = teacher.schedule
    deadline = time.monotonic() + 60 * minutes if minutes else None
    bar = tqdm(range(steps), desc="teacher", disable=not progress)
    for step in bar:
        lr_now = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
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
        # the target by the teacher's parameterisation (ε for the shipped config: the noise itself)
        loss = torch.nn.functional.mse_loss(teacher.eps(sched.add_noise(x0, noise, t), t, cond),
                                            sched.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 1000 == 999:
            _save(ema, out, step + 1, batch)
        if deadline and time.monotonic() > deadline:
            break
    _save(ema, out, step + 1, batch)
    return ema


def _save(ema: DigitsTeacher, out, steps: int, batch: int) -> None:
    ema.info = {"steps": steps, "batch": batch}
    ema.save(out)
