"""The networks of the training path, by role: each call says which network answers.

Teacher, student, EMA target, fake score, generator average and feedback LoRA are one UNet with
different adapters switched on. A ``Role`` owns that switch: which adapters are active, which of
their weights train, whether gradients may flow, and FP8 for the frozen teacher. It switches for
the duration of its own call and puts back what it found, so a call site never depends on which
adapter some earlier line left on. ``lora.adapter`` / ``fp8.teacher_pass`` stay the mechanism.

A trainable role's update runs its backward inside ``running()``: autograd accumulates only into
weights that require gradients when backward runs, and outside the pass the fake score's do not.

Roles do not nest: inside one role's ``running()`` another role's call is refused (its switch
would undo the outer one's on exit); the same role's calls inside it switch nothing.
"""

from __future__ import annotations

import contextlib

import torch

from hypersd import lora
from hypersd.nets import fp8
from hypersd.teachers.base import Cond, Teacher

RUNNING = "_hypersd_role"  # on the UNet's __dict__: the role whose switch is in place now


class Role:
    """One network: ``adapters`` active (None: every adapter off, the teacher), ``trainable`` the
    adapters whose weights train, ``grad`` False to run without gradients whatever the caller's mode
    (None: the caller's mode, so a trainable network can also be sampled under ``no_grad``)."""

    def __init__(self, teacher: Teacher, name: str, adapters: tuple[str, ...] | None,
                 trainable: tuple[str, ...] = (), grad: bool | None = None):
        self.teacher, self.name = teacher, name
        self.adapters, self.trainable, self.grad = adapters, trainable, grad

    @property
    def unet(self) -> torch.nn.Module:
        return self.teacher.unet

    @contextlib.contextmanager
    def running(self):
        """This network's adapters and gradient flags in place; the previous ones back after."""
        unet = self.unet
        current = unet.__dict__.get(RUNNING)
        if current is self:
            yield self
            return
        if current is not None:
            raise RuntimeError(f"the {self.name} network was called inside the {current.name} network's pass")
        unet.__dict__[RUNNING] = self
        try:
            with self._grad_mode(), self._switch():
                yield self
        finally:
            unet.__dict__.pop(RUNNING, None)

    def _grad_mode(self):
        return torch.no_grad() if self.grad is False else contextlib.nullcontext()

    @contextlib.contextmanager
    def _switch(self):
        if self.adapters is None:  # the frozen teacher: adapters off, FP8 copies where enabled
            with fp8.teacher_pass(self.unet):
                yield
            return
        names = list(self.adapters)
        with lora.adapter(self.unet, names if len(names) > 1 else names[0]):  # restores set and flags on exit
            lora.activate(self.unet, names, trainable=self.trainable)
            yield

    def __call__(self, x: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        """The network's output (ε, v or flow's v) in float32."""
        with self.running():
            return self.teacher.eps(x, t, cond)

    def cfg(self, x: torch.Tensor, t, cond: Cond, uncond: Cond, w) -> torch.Tensor:
        """Guided output, conditional and unconditional rows in one call."""
        with self.running():
            return self.teacher.eps_cfg(x, t, cond, uncond, w)

    def fn(self, cond: Cond, uncond: Cond | None = None, w=1.0):
        """``model_fn(x, t)`` for the samplers and losses: this network on ``cond`` (guided by ``w``
        against ``uncond`` when given)."""
        if uncond is None:
            return lambda x, t: self(x, t, cond)
        return lambda x, t: self.cfg(x, t, cond, uncond, w)

    def __repr__(self) -> str:
        return f"Role({self.name!r}, adapters={self.adapters}, trainable={self.trainable}, grad={self.grad})"


class Roles:
    """Every network a stage runs, on one teacher's UNet."""

    def __init__(self, teacher: Teacher):
        # the teacher: frozen and without gradients (FP8 applies only then)
        self.teacher = Role(teacher, "teacher", None, grad=False)
        self.student = Role(teacher, "student", (lora.STUDENT,), trainable=(lora.STUDENT,))
        # a bootstrapped target: no gradient ever reaches it (it follows the student by EMA)
        self.ema = Role(teacher, "EMA target", (lora.EMA,), grad=False)
        self.fake = Role(teacher, "fake score", (lora.FAKE,), trainable=(lora.FAKE,))
        # the fake score read by the generator's GAN term: gradients flow through it to the
        # generator's samples, and reach none of its weights
        self.fake_frozen = Role(teacher, "fake score (frozen)", (lora.FAKE,))
        self.average = Role(teacher, "generator average", (lora.AVERAGE,), grad=False)
        # the feedback LoRA trains on top of the frozen distilled student: both answer together
        self.feedback = Role(teacher, "feedback", (lora.STUDENT, lora.FEEDBACK), trainable=(lora.FEEDBACK,))
