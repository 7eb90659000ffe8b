"""TSCD trained to its answer on a teacher whose solution is known in closed form.

Data x0 ~ N(μ, s²) under SD's schedule: for x_t = √ᾱ·x0 + √(1−ᾱ)·ε the exact ε-prediction is
E[ε | x_t] = √(1−ᾱ)·(x_t − √ᾱ·μ) / (ᾱs² + 1 − ᾱ), affine in x_t, so each DDIM step with it is
affine and the teacher's N-step solution over any stretch of the grid is an affine map computed
here by hand. (It is the probability-flow ODE's map x0 = μ + s·(x_T − √ᾱ_T·μ)/√(ᾱ_T·s² + 1 − ᾱ_T)
only as N grows: on the 10-point trailing grid its slope is 0.385 against the ODE's 0.5. The
distillation's fixed point is the teacher's solver, so that is what the student is held to.)

The student is that exact ε plus a LoRA on an affine correction per grid point: the fixed point
lies within its reach, and the whole training path runs as it does on a UNet (the TSCD stage, the
trainer's step, the adapter switches for teacher, student and EMA target). A wrong jump, target
timestep or EMA update trains to some other map, which wiring tests do not see and this one does.
"""

from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler
from diffusers.loaders.peft import PeftAdapterMixin

from hypersd import lora
from hypersd.core.sampling import sample_tcd
from hypersd.core.schedule import trailing
from hypersd.core.solver import ddim_jump
from hypersd.teachers.base import Cond, Teacher
from hypersd.teachers.digits import SCHEDULER_CONFIG
from hypersd.train.recipe import TSCDStage
from hypersd.train.runtime import Runtime
from hypersd.train.stages import TSCDRun
from hypersd.train.trainer import train_step

MU, S = 0.4, 0.5
N, K = 10, 2  # the teacher's grid, the segments
ACP = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod.float()
T = len(ACP)


def exact_eps(x, a):
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


class GaussianEps(PeftAdapterMixin, torch.nn.Module):
    """The exact ε plus ``correction``: zero in the base, so the teacher (adapters off) is exact,
    and a LoRA on it adds a·x + b at each grid point (one-hot features pick the point's a and b)."""

    def __init__(self):
        super().__init__()
        self.correction = torch.nn.Linear(2 * N, 1, bias=False)
        torch.nn.init.zeros_(self.correction.weight)

    def forward(self, x, t):
        hot = torch.nn.functional.one_hot(t // (T // N), N).to(x.dtype)
        return exact_eps(x, ACP[t].view(-1, 1)) + self.correction(torch.cat([x * hot, hot], 1))


class GaussianTeacher(Teacher):
    latent_shape = (1,)
    default_guidance = 1.0

    def __init__(self):
        self.alphas_cumprod, self.unet = ACP, GaussianEps()

    def eps(self, x, t, cond):
        return self.unet(x, torch.as_tensor(t).expand(x.shape[0]))


def teacher_solution(x, start, stop):
    """The teacher's DDIM from grid point ``start`` down to ``stop`` (-1: clean), written out."""
    ts = [t for t in trailing(T, N) if stop < t <= start] + [stop]
    for t, s in zip(ts, ts[1:]):
        a, a_s = ACP[t], ACP[s] if s >= 0 else torch.tensor(1.0)
        e = exact_eps(x, a)
        x = a_s.sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt() + (1 - a_s).sqrt() * e
    return x


def _student_jump(teacher, x, start, stop):
    with torch.no_grad():
        return ddim_jump(x, teacher.eps(x, start, None), torch.tensor(start), torch.tensor(stop), ACP)


def _two_step(teacher, x):
    with torch.no_grad():
        return sample_tcd(lambda x, t: teacher.eps(x, t, None), x, trailing(T, K), ACP)


def test_tscd_student_reaches_the_teachers_closed_form_solution():
    torch.manual_seed(0)  # LoRA A starts random
    teacher = GaussianTeacher()
    teacher.unet.requires_grad_(False)
    lora.add_lora(teacher.unet, lora.lora_config(2, 2, ["correction"]), lora.STUDENT)
    lora.activate(teacher.unet, lora.STUDENT, trainable=(lora.STUDENT,))
    empty = Cond(torch.zeros(1, 1, 1))
    d = SimpleNamespace(teacher=teacher, generator=torch.Generator().manual_seed(1), uncond_row=empty, rt=Runtime())
    run = TSCDRun(d, TSCDStage(name="t", segments=K, end="boundary", guidance=[1.0, 1.0], solver_steps=N,
                                ema_decay=0.5))
    run.enter(fresh=True)
    x = torch.linspace(-3, 3, 61).view(-1, 1)  # x_T: noise out to 3σ
    want = teacher_solution(x, T - 1, -1)
    untrained = (_two_step(teacher, x) - want).abs().max()
    opt = torch.optim.Adam(run.params, lr=1e-2)
    for _ in range(300):
        z = MU + S * torch.randn((256, 1), generator=d.generator)
        train_step(d.rt, run, opt, z, None, empty.repeat(256), None)

    mid = trailing(T, K)[1]
    assert torch.allclose(_student_jump(teacher, x, T - 1, mid), teacher_solution(x, T - 1, mid), atol=0.02)
    assert torch.allclose(_student_jump(teacher, x, mid, -1), teacher_solution(x, mid, -1), atol=0.02)
    got = _two_step(teacher, x)
    assert (got - want).abs().max() < 0.02 < untrained / 10  # the untrained student is the teacher's 2 steps
    # samples from N(0, 1) noise: mean the map's value at 0, spread its slope
    slope, want_slope = (got[-1] - got[0]) / 6, (want[-1] - want[0]) / 6
    assert abs(slope - want_slope) < 0.01 and abs(got[30] - want[30]) < 0.01
