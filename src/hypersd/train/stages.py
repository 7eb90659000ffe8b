"""The stage kinds: how each recipe stage sets up its adapters and computes its loss.

The trainer loop is the same for every kind: it asks the stage for its trainable parameters and
its loss, steps one optimizer, and calls ``after_step`` (the EMA target, the discriminator, the
fake score). The losses themselves live in ``tscd``, ``feedback`` and ``dmd``. A stage sees the
run through its ``StageContext`` only, and runs each network through its role (``roles.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from hypersd import lora
from hypersd.core.sampling import sample_tcd
from hypersd.core.solver import add_noise
from hypersd.losses.adversarial import (
    Discriminator,
    DiscriminatorHeads,
    hinge_d_loss,
    hinge_g_loss,
    logistic_d_loss,
    logistic_g_loss,
)
from hypersd.losses.dmd import (
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    draw_generator_step,
    generate,
    red_loss,
    regression_loss,
    score_x0,
    simulate,
)
from hypersd.losses.feedback import (
    draw_stop,
    load_perception,
    load_terms,
    perceptual_loss,
    reward_loss,
    sample_until,
)
from hypersd.losses.tscd import ConsistencyConfig, ConsistencyStep
from hypersd.nets import shard, speed
from hypersd.teachers.base import Cond
from hypersd.train.context import StageContext
from hypersd.train.recipe import DMDStage, FeedbackStage, MergeStage, Stage, TSCDStage


def default_guidance_range(teacher) -> list[float]:
    w = teacher.default_guidance
    return [max(1.0, 0.75 * w), 1.25 * w] if w > 1 else [1.0, 1.0]


class StageRun:
    """One stage in progress, in a ``StageContext`` (or anything ``StageContext.of`` takes)."""

    def __init__(self, ctx, stage: Stage):
        self.ctx, self.stage = StageContext.of(ctx), stage
        self.teacher, self.unet, self.roles = self.ctx.teacher, self.ctx.teacher.unet, self.ctx.roles
        self.schedule = self.ctx.schedule  # every loss and sampler reads the network's output on it
        self.params: list[torch.nn.Parameter] = []

    def enter(self, fresh: bool) -> None:
        """Put the stage's adapters in place; ``fresh``: at the stage's start, not a resume."""

    def loss(self, z: torch.Tensor, prompts: list[str], cond: Cond) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self) -> dict:
        return {}

    def pieces(self) -> dict:
        """What a checkpoint must hold of the stage besides the adapters (saved anyway), by name,
        each with ``state_dict()`` / ``load_state_dict()``: the trainer registers them while the
        stage runs (``checkpoint.StateRegistry``). Complete once ``enter`` ran."""
        return {}

    def finish(self, folder: Path) -> None:
        """Write the stage's LoRA: the student as it stands after the stage."""
        lora.save_lora(folder / "lora.safetensors", self.unet, self.ctx.lora_meta(self.stage))

    def student_fn(self, role, cond: Cond):
        """``role``'s model_fn on ``cond`` as the LoRA is sampled: with its own CFG at the recorded
        guidance under ``cfg: preserve`` (the unconditional rows the empty prompt), else conditional alone."""
        if self.ctx.cfg != "preserve":
            return role.fn(cond)
        return role.fn(cond, cond.unconditional(self.ctx.uncond_row), self.ctx.cfg_guidance)

    def drop_prompts(self, cond: Cond) -> Cond:
        """Under ``cfg: preserve``, each row replaced by the empty prompt with probability
        ``cfg_dropout``, so that the student's unconditional prediction is a trained one."""
        if self.ctx.cfg != "preserve":
            return cond
        keep = torch.rand(len(cond), generator=self.ctx.generator) >= self.ctx.cfg_dropout
        return cond.where(keep, cond.unconditional(self.ctx.uncond_row))

    def _rank_alpha(self, rank: int | None) -> tuple[int, float]:
        rank = rank or self.ctx.lora_rank
        return rank, self.ctx.lora_alpha or rank


class TSCDRun(StageRun):
    stage: TSCDStage

    def __init__(self, ctx, stage: TSCDStage):
        super().__init__(ctx, stage)
        # preserve: the conditional teacher alone unless the stage asks for a guidance range
        guidance = stage.guidance or (None if self.ctx.cfg == "preserve" else default_guidance_range(self.teacher))
        self.step = ConsistencyStep(self.teacher, ConsistencyConfig(
            segments=stage.segments, end=stage.end, boundary_prob=stage.boundary_prob,
            guidance=None if guidance is None else tuple(guidance),
            distance=stage.distance, huber_c=stage.huber_c, offset_noise=stage.offset_noise,
            solver_steps=stage.solver_steps, solve_below=stage.solve_below,
            solve_stride=stage.solve_stride), self.roles,
            lockstep=self.ctx.rt.most if shard.is_sharded(self.unet) else None)
        self.disc = self.d_opt = None
        if stage.adv_weight > 0:
            heads = DiscriminatorHeads.for_network(self.unet, stage.d_hidden).to(self.teacher.device)
            self.disc = Discriminator(self.teacher, heads)
            # weight decay 0.01: torch's AdamW default, which the heads have always trained with
            self.d_opt = speed.optimizer(heads.parameters(), stage.d_lr, weight_decay=0.01, betas=(0.0, 0.99))

    def enter(self, fresh: bool) -> None:
        lora.ensure_lora(self.unet, lora.EMA, **lora.spec(self.unet, lora.STUDENT))
        lora.activate(self.unet, lora.STUDENT, trainable=(lora.STUDENT,))
        self.params = lora.adapter_params(self.unet, lora.STUDENT)
        self.ema = lora.adapter_params(self.unet, lora.EMA)
        if fresh:  # a stage's target starts as its student
            with torch.no_grad():
                torch._foreach_copy_(self.ema, self.params)

    def loss(self, z, prompts, cond):
        s = self.stage
        cond = self.drop_prompts(cond)
        pred, tgt, t_end = self.step(z, cond, cond.unconditional(self.ctx.uncond_row), self.ctx.generator)
        d = self.step.loss(pred, tgt)
        loss, logs = s.mse_weight * d, {s.distance: d}  # logged by its name: mse, huber or l1
        if self.disc is not None:
            logs["g"] = hinge_g_loss(self.disc(pred, t_end, cond))
            loss = loss + s.adv_weight * logs["g"]
            self._for_d = (pred.detach(), self._adv_real(z, tgt, t_end), t_end, cond)
        return loss, logs

    def _adv_real(self, z, tgt, t_end):
        """The discriminator's real sample: the EMA target, or (``adv_real: data``) the batch's
        own latents at t_end, whose clean backgrounds the target and the jump may both lack."""
        if self.stage.adv_real == "target":
            return tgt
        noise = torch.randn(z.shape, generator=self.ctx.generator).to(z.device)
        return self.schedule.add_noise(z, noise, t_end)

    def after_step(self) -> dict:
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1 - self.stage.ema_decay)
        if self.disc is None:
            return {}
        pred, real, t_end, cond = self._for_d
        d_loss = hinge_d_loss(self.disc(real, t_end, cond), self.disc(pred, t_end, cond))
        self.d_opt.zero_grad(set_to_none=True)
        self.ctx.rt.step(d_loss, self.d_opt, self.disc.heads.parameters(), role="discriminator")
        return {"d": d_loss}

    def pieces(self) -> dict:
        return {} if self.disc is None else {"heads": self.disc.heads, "d_opt": self.d_opt}


class FeedbackRun(StageRun):
    """A separate LoRA (``feedback``) trained on top of the frozen distilled one."""

    stage: FeedbackStage

    def __init__(self, ctx, stage: FeedbackStage):
        super().__init__(ctx, stage)
        self.terms = load_terms(stage.rewards, self.teacher.device)
        self.features = load_perception(stage.perceptual_model).to(self.teacher.device) \
            if stage.perceptual_weight > 0 else None

    def enter(self, fresh: bool) -> None:
        if fresh:  # a fresh feedback LoRA: zero effect on the distilled one
            lora.remove_lora(self.unet, lora.FEEDBACK)
        student = lora.spec(self.unet, lora.STUDENT)
        rank, alpha = self._rank_alpha(self.stage.rank or student["rank"])
        lora.ensure_lora(self.unet, lora.FEEDBACK, rank, alpha, student["targets"])
        lora.activate(self.unet, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))
        self.params = lora.adapter_params(self.unet, lora.FEEDBACK)

    def loss(self, z, prompts, cond):
        s, g, eps_fn = self.stage, self.ctx.generator, self.student_fn(self.roles.feedback, cond)
        loss, logs = z.new_zeros(()), {}
        if self.terms:
            noise = torch.randn(z.shape, generator=g).to(z.device)
            # where the sampler stops is how many calls it makes: every process draws the same
            timesteps, stop = draw_stop(s.sample_steps, s.t_range, self.teacher.T, self.ctx.control,
                                        self.schedule.spacing)
            x0 = sample_until(eps_fn, noise, timesteps, stop, self.schedule)
            r_loss, logs = reward_loss(self.terms, self.teacher.decode(x0), prompts)
            loss = loss + r_loss
        if self.features is not None:
            t = torch.randint(s.perceptual_t[0], s.perceptual_t[1] + 1, (len(z),), generator=g).to(z.device)
            noise = torch.randn(z.shape, generator=g).to(z.device)
            logs["perc"] = perceptual_loss(self.features, eps_fn, z, noise, t, self.schedule, self.teacher.decode)
            loss = loss + s.perceptual_weight * logs["perc"]
        return loss, logs

    def finish(self, folder: Path) -> None:
        """The feedback LoRA alone, and the two merged at ratio 1 (what the stage samples like)."""
        meta = self.ctx.lora_meta(self.stage)
        lora.save_lora(folder / "feedback.safetensors", self.unet, {**meta, "role": "feedback"}, lora.FEEDBACK)
        state, spec = current_lora(self.unet)
        lora.save_state(folder / "lora.safetensors", state, {**meta, **spec})


def merged(unet, ratio: float) -> tuple[dict, dict]:
    return lora.merge_states(lora.get_state(unet, lora.STUDENT), lora.spec(unet, lora.STUDENT),
                             lora.get_state(unet, lora.FEEDBACK), lora.spec(unet, lora.FEEDBACK), ratio)


def current_lora(unet) -> tuple[dict, dict]:
    """What the UNet samples with now, as one LoRA: the student, plus the feedback LoRA (ratio 1)
    while one is active on top of it."""
    if lora.FEEDBACK in lora.active(unet):
        return merged(unet, 1.0)
    return lora.get_state(unet, lora.STUDENT), lora.spec(unet, lora.STUDENT)


class MergeRun(StageRun):
    """student := student + ratio·feedback, exactly, or its nearest LoRA of the stage's ``rank``;
    the feedback adapter is then removed."""

    stage: MergeStage

    def finish(self, folder: Path) -> None:
        state, spec = merged(self.unet, self.stage.ratio)
        if self.stage.rank is not None:
            state, spec = lora.compress_state(state, spec, self.stage.rank)
        lora.remove_lora(self.unet, lora.FEEDBACK)
        for name in (lora.STUDENT, lora.EMA):
            lora.ensure_lora(self.unet, name, **spec)
            lora.set_state(self.unet, state, name)
        lora.activate(self.unet, lora.STUDENT, trainable=(lora.STUDENT,))
        super().finish(folder)


class DMDRun(StageRun):
    """DMD: the student generates at ``generator_t`` (or, with ``generator_steps``, at a step of its
    own few-step sampler); a ``fake`` LoRA tracks its samples."""

    stage: DMDStage

    def __init__(self, ctx, stage: DMDStage):
        super().__init__(ctx, stage)
        self.terms = load_terms(stage.rewards, self.teacher.device)
        # preserve: the student's CFG samples at its guidance follow the teacher's at the same guidance
        self.w_real = stage.guidance or self.ctx.cfg_guidance or self.teacher.default_guidance
        self.heads = None
        if stage.gan_weight > 0:  # built here, as TSCD's: a resumed stage's heads load over these
            self.heads = DiscriminatorHeads.for_network(self.unet, stage.gan_hidden).to(self.teacher.device)

    def enter(self, fresh: bool) -> None:
        s, unet = self.stage, self.unet
        if fresh:  # the fake score starts as the teacher
            lora.remove_lora(unet, lora.FAKE)
        rank, alpha = self._rank_alpha(s.fake_rank)
        lora.ensure_lora(unet, lora.FAKE, rank, alpha, lora.spec(unet, lora.STUDENT)["targets"])
        if s.keep_weight > 0:  # the anchor: the student as the stage found it, in the EMA adapter
            lora.ensure_lora(unet, lora.EMA, **lora.spec(unet, lora.STUDENT))
            if fresh:
                lora.set_state(unet, lora.get_state(unet, lora.STUDENT), lora.EMA)
            self.keep_t = sorted({t for k in s.keep_steps for t in self.schedule.inference_timesteps(k)}
                                 - {s.generator_t})
        if s.generator_ema > 0:  # the average starts where the generator does
            lora.ensure_lora(unet, lora.AVERAGE, **lora.spec(unet, lora.STUDENT))
            if fresh:
                lora.set_state(unet, lora.get_state(unet, lora.STUDENT), lora.AVERAGE)
        lora.activate(unet, lora.STUDENT, trainable=(lora.STUDENT,))  # after any add: an added adapter becomes active
        self.params = lora.adapter_params(unet, lora.STUDENT)
        self.average = lora.adapter_params(unet, lora.AVERAGE) if s.generator_ema > 0 else []
        self.fake_params = lora.adapter_params(unet, lora.FAKE)
        self.fake_opt = speed.optimizer(self.fake_params, s.fake_lr, betas=s.fake_betas)
        if self.heads is not None:  # the classifier steps with the fake score, on its loss (DMD2)
            self.fake_opt.add_param_group({"params": list(self.heads.parameters())})
            self.classifier = Discriminator(self.teacher, self.heads, self.roles.fake)
            self.critic = Discriminator(self.teacher, self.heads, self.roles.fake_frozen)
        self._make_pool()
        if fresh and s.fake_warmup:
            for _ in tqdm(range(s.fake_warmup), desc=f"{s.name} fake-score warm-up", disable=not self.ctx.progress,
                          leave=False):
                z, _, cond = self.ctx.batch(s.batch)
                with self.ctx.rt.autocast():  # the generator's pass too: SD's frozen weights are in fp16/bf16
                    self._fake_update(self._sample(cond, z.shape), cond, z)

    @torch.no_grad()
    def _make_pool(self) -> None:
        """Noise, prompts and the teacher's ODE output from that noise, for the regulariser.

        Its own seed, so a resumed run rebuilds the same pool instead of storing it."""
        s, t = self.stage, self.teacher
        g = torch.Generator().manual_seed(self.ctx.stage_seed(s, 7919))
        z, _, cond = self.ctx.batch(s.reg_pool, g)  # from the cache where there is one: no text encoder
        # the draw's latent size (a bucketed cache's draw is one bucket, whose size SDXL's time ids name);
        # float32: the network call casts its own input
        noise = torch.randn(z.shape, generator=g).to(t.device)
        uncond, w = t.empty_cond(1), self.w_real  # the ODE of the teacher the real score is
        timesteps = self.schedule.inference_timesteps(s.reg_steps)
        out, teacher = [], self.roles.teacher
        with teacher.running():  # one switch for the whole ODE
            for i in range(0, s.reg_pool, 256):
                c = cond[i:i + 256]
                eps = teacher.fn(c, c.unconditional(uncond), w)
                out.append(sample_tcd(eps, noise[i:i + 256], timesteps, self.schedule))
        self.pool = (noise, cond, torch.cat(out))

    def _sample(self, cond: Cond, shape) -> torch.Tensor:
        """The student's one-step samples for ``cond`` at the latent ``shape`` of its batch (its bucket's)."""
        t = self.teacher
        noise = torch.randn(shape, generator=self.ctx.generator).to(t.device)
        with torch.no_grad():
            x_t, t_gen = self._generator_input(noise, cond)
            return generate(self.student_fn(self.roles.student, cond), x_t, t_gen, self.schedule)

    def _generator_input(self, noise: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, int]:
        """Where this generator step starts: (x, t) at step i of a drawn k-step sampler (k = 1: the
        noise at generator_t; ``generator_steps`` [1] always draws that one)."""
        s = self.stage
        k, i = draw_generator_step(s.generator_steps, self.ctx.control)  # i calls: every process draws the same
        timesteps = self.schedule.inference_timesteps(k, s.generator_t)
        x_t = simulate(self.student_fn(self.roles.student, cond), noise, timesteps, i, self.schedule,
                       eta=s.generator_eta, generator=self.ctx.generator)
        return x_t, timesteps[i]

    def _fake_update(self, x: torch.Tensor, cond: Cond, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One fake-score step on the generator's samples ``x``; with the GAN term, the classifier's
        loss on ``real`` (the batch's latents) against them joins it. (denoising loss, classifier's)."""
        g, fake = self.ctx.generator, self.roles.fake
        t = torch.randint(0, self.teacher.T, (len(x),), generator=g).to(x.device)
        noise = torch.randn(x.shape, generator=g).to(x.device)
        params, cls = self.fake_params, None
        with fake.running():  # the fake adapter active and trainable for the whole update
            with self.ctx.rt.autocast():
                denoise = loss = denoising_loss(fake.fn(cond), x, noise, t, self.schedule)
                if self.heads is not None:
                    cls = self._classifier_loss(real, x, cond)
                    loss, params = loss + self.stage.gan_d_weight * cls, params + list(self.heads.parameters())
            self.fake_opt.zero_grad(set_to_none=True)
            self.ctx.rt.step(loss, self.fake_opt, params, self.ctx.grad_clip, role="fake")
        return denoise.detach(), None if cls is None else cls.detach()

    def _gan_noised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x diffused to a t of gan_t_range, each row its own: what the classifier sees (DMD2)."""
        g, (lo, hi) = self.ctx.generator, self.stage.gan_t_range
        t = torch.randint(lo, hi + 1, (len(x),), generator=g).to(x.device)
        return self.schedule.add_noise(x, torch.randn(x.shape, generator=g).to(x.device), t), t

    def _classifier_loss(self, real: torch.Tensor, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        """softplus(−D(real)) + softplus(D(x)), real and fake in one backbone call; the backbone's
        features without gradient unless gan_train_fake (then the fake LoRA learns from it too)."""
        n = len(x)
        x_t, t = self._gan_noised(torch.cat([real.to(x), x.detach()]))
        with torch.set_grad_enabled(self.stage.gan_train_fake):
            feats = self.classifier.features(x_t, t, Cond.cat([cond, cond]))
        logits = self.heads(feats)
        return logistic_d_loss(logits[:n], logits[n:])

    def _gan_loss(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        """softplus(−D(x)) through the frozen fake score's features to x; the heads take no gradient."""
        x_t, t = self._gan_noised(x)
        self.heads.requires_grad_(False)  # at forward time: autograd then records no path into them
        try:
            return logistic_g_loss(self.critic(x_t, t, cond))
        finally:
            self.heads.requires_grad_(True)

    def loss(self, z, prompts, cond):
        s, g, t_, roles = self.stage, self.ctx.generator, self.teacher, self.roles
        n = len(z)
        # the batch's own latent size (an aspect-ratio bucket's; the teacher's square otherwise)
        noise = torch.randn(z.shape, generator=g).to(self.teacher.device)
        pool_noise, pool_cond, pool_out = self.pool
        idx = torch.randint(len(pool_noise), (s.reg_batch,), generator=g).to(pool_noise.device)
        x_t, t_gen = self._generator_input(noise, cond)
        # one student call for both; a bucket's size is each process's own draw: they agree on it first
        if t_gen == s.generator_t and self.ctx.rt.everywhere(noise.shape[1:] == pool_noise.shape[1:]):
            both = Cond.cat([cond, pool_cond[idx]])
            x_all = generate(self.student_fn(roles.student, both), torch.cat([x_t, pool_noise[idx]]), t_gen,
                             self.schedule)
            x, x_reg = x_all[:n], x_all[n:]
        else:  # another step of a k-step sampler, or a bucket's size: the regulariser holds the one-step
            # generator on its square pool in a call of its own
            x = generate(self.student_fn(roles.student, cond), x_t, t_gen, self.schedule)
            x_reg = generate(self.student_fn(roles.student, pool_cond[idx]), pool_noise[idx], s.generator_t,
                             self.schedule)

        t = torch.randint(s.t_range[0], s.t_range[1] + 1, (n,), generator=g).to(x.device)
        noise_t = torch.randn(x.shape, generator=g).to(x.device)
        x_real, noise_real, t_real, cond_real = x.detach(), noise_t, t, cond
        if s.red_weight > 0:  # its rows join the real score's call: one teacher call, twice the rows
            t_red = torch.randint(s.red_t_range[0], s.red_t_range[1] + 1, (n,), generator=g).to(x.device)
            noise_red = torch.randn(x.shape, generator=g).to(x.device)
            x_real, noise_real = torch.cat([x_real, x_real]), torch.cat([noise_t, noise_red])
            t_real, cond_real = torch.cat([t, t_red]), Cond.cat([cond, cond])
        uncond = cond_real.unconditional(self.ctx.uncond_row)
        with roles.teacher.running():  # one switch around the whole score
            x0_real = score_x0(roles.teacher.fn(cond_real, uncond, self.w_real), x_real, noise_real, t_real,
                               self.schedule)
        x0_real, x0_red = x0_real[:n], x0_real[n:]
        x0_fake = score_x0(roles.fake.fn(cond), x.detach(), noise_t, t, self.schedule)
        logs = {"dmd": dmd_loss(x, dmd_gradient(x.detach(), x0_real, x0_fake)),
                "reg": regression_loss(x_reg, pool_out[idx], s.reg_distance)}
        loss = s.dmd_weight * logs["dmd"] + s.reg_weight * logs["reg"]
        if s.red_weight > 0:
            logs["red"] = red_loss(x, x0_red)
            loss = loss + s.red_weight * logs["red"]
        if s.keep_weight > 0:
            logs["keep"] = self._keep_loss(z[:s.keep_batch], self.drop_prompts(cond[:s.keep_batch]))
            loss = loss + s.keep_weight * logs["keep"]
        if self.terms:
            r_loss, r_logs = reward_loss(self.terms, t_.decode(x), prompts)
            loss, logs = loss + r_loss, logs | r_logs
        if self.heads is not None:  # last: a stage without it draws from the stream as before the option
            logs["gan"] = self._gan_loss(x, cond)
            loss = loss + s.gan_weight * logs["gan"]
        self._last = (x.detach(), cond, z)
        return loss, logs

    def _keep_loss(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        """‖ε_stu − ε_anchor‖² on real latents noised to the other samplers' timesteps."""
        g = self.ctx.generator
        t = torch.tensor(self.keep_t)[torch.randint(len(self.keep_t), (len(z),), generator=g)].to(z.device)
        x_t = add_noise(z, torch.randn(z.shape, generator=g).to(z.device), t, self.schedule)
        anchor = self.roles.ema(x_t, t, cond)  # the anchor: the student as the stage found it
        return (self.roles.student(x_t, t, cond) - anchor).pow(2).mean()

    def after_step(self) -> dict:
        # Every fake update reuses this step's samples with fresh noise and timesteps: a new
        # generator batch per update would cost a student pass each and move the fake score no
        # further (the generator has not changed in between).
        x, cond, z = self._last
        fake, cls = zip(*[self._fake_update(x, cond, z) for _ in range(self.stage.fake_updates)])
        if self.average:
            with torch.no_grad():
                torch._foreach_lerp_(self.average, self.params, 1 - self.stage.generator_ema)
        logs = {"fake": torch.stack(fake).mean()}
        if self.heads is not None:
            logs["gan_d"] = torch.stack(cls).mean()
        return logs

    def finish(self, folder: Path) -> None:
        """With ``generator_ema``, the average becomes the student the stage hands on."""
        if self.average:
            lora.set_state(self.unet, lora.get_state(self.unet, lora.AVERAGE), lora.STUDENT)
            lora.remove_lora(self.unet, lora.AVERAGE)
            lora.activate(self.unet, lora.STUDENT, trainable=(lora.STUDENT,))
        super().finish(folder)

    def pieces(self) -> dict:
        # the regulariser's pool is not among them: its own seed rebuilds it on a resume
        return {"fake_opt": self.fake_opt} | ({} if self.heads is None else {"gan_heads": self.heads})


RUNS = {"tscd": TSCDRun, "feedback": FeedbackRun, "merge": MergeRun, "dmd": DMDRun}


def stage_run(ctx, stage: Stage) -> StageRun:
    return RUNS[stage.kind](ctx, stage)
