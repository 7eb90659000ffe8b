"""The trainer loop: runs a recipe's stages in order, checkpointing, resuming, evaluating.

The loop knows nothing of any one method: each stage kind (``stages.py``) sets up its adapters
and builds its loss from the stage's config; the loop steps the optimizer and writes files.
Nor of any one backbone: the recipe's (``backbones``) loads the teacher, serves the data and its
conditioning, writes the sample grids and evaluates the final LoRA.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hypersd import lora
from hypersd.backbones import get_backbone
from hypersd.errors import HypersdError
from hypersd.nets import fp8, quant, shard, speed
from hypersd.outputs import write_text
from hypersd.train.checkpoint import (
    FORMAT,
    StateRegistry,
    list_checkpoints,
    load_latest,
    save_checkpoint,
    saved_pieces,
    split_states,
)
from hypersd.train.context import StageContext, preserved_cfg
from hypersd.train.lr_schedule import set_lr, stage_lr
from hypersd.train.recipe import Recipe, Stage, check_timesteps
from hypersd.train.runlog import RunLog
from hypersd.train.runtime import RandomStreams, Runtime, run_streams
from hypersd.train.stages import StageRun, current_lora, stage_run


def _warn(msg: str) -> None:
    """On the console even with --quiet: the run goes on, but from further back than asked."""
    tqdm.write(f"hypersd: warning: {msg}", file=sys.stderr)


def train_step(rt: Runtime, run: StageRun, opt, z, prompts, cond, grad_clip: float) -> dict | None:
    """One optimizer step of a stage: its loss (under autocast), the update, its after-step work.
    None when the loss or its gradients are not finite on some process: the step is skipped
    everywhere, and so is the after-step work (the discriminator and the fake score would learn
    from the same bad samples)."""
    with rt.autocast():
        loss, logs = run.loss(z, prompts, cond)
    opt.zero_grad(set_to_none=True)
    grad_norm = rt.step(loss, opt, run.params, grad_clip, role="student")
    if grad_norm is None:
        return None
    logs |= {"grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"]}
    if not torch.isfinite(grad_norm):  # an fp16 overflow the scaler skipped: no update, nothing to follow it
        return logs
    with rt.autocast():
        return logs | run.after_step()


def has_run(out: str | Path) -> bool:
    """Whether ``out`` holds a run to resume: a checkpoint in its checkpoints folder."""
    return bool(list_checkpoints(Path(out) / "checkpoints"))


def check_rewards(recipe: Recipe) -> None:
    """Load every stage's rewards once, now: a missing weight file should stop the run before its
    first stage, not hours later when the feedback stage begins."""
    from hypersd.losses.feedback import load_terms

    for stage in recipe.stages:
        try:
            terms = load_terms(getattr(stage, "rewards", None) or [])
        except HypersdError as e:
            raise HypersdError(f"stage {stage.name!r}: {e}") from None
        del terms


class Distiller:
    def __init__(self, recipe: Recipe, out_dir: str | Path, progress: bool = True, teacher=None,
                 log_with: list[str] | None = None):
        self.recipe, self.out = recipe, Path(out_dir)
        self.backbone = get_backbone(recipe.backbone)
        opened = self.backbone.open_data(recipe)  # refuses a wrong or missing cache before a large model loads
        self.rt = Runtime.create(recipe.run.device, recipe.run.mixed_precision)
        self.progress = progress and self.rt.is_main  # one bar per run, not one per process
        self.log = RunLog(self.out, self.rt.is_main, log_with)  # a missing tracker package: refused now
        self.rt.guard.limit = recipe.run.max_bad_steps
        dtype = self.backbone.teacher_dtype(self.rt)
        quantized = recipe.run.quantize_base != "none"
        if recipe.run.shard_base:
            shard.check_shardable(recipe, self.rt.world)
        # a base to quantize (or shard) loads on the CPU and reaches the GPU layer by layer, quantized (sharded)
        load_on = torch.device("cpu") if quantized or recipe.run.shard_base else self.rt.device
        self.teacher = teacher or self.backbone.load_teacher(recipe, load_on, dtype)
        self.backbone.adapt_teacher(recipe, self.teacher)  # a given teacher too: the recipe's VAE, say
        check_timesteps(recipe, "recipe", self.teacher.schedule)  # on its own T and spacing (flow: σ grid)
        unet = self.teacher.unet
        unet.requires_grad_(False)
        if quantized:  # before any LoRA: peft picks its quantization-aware layer when an adapter is made
            quant.quantize_teacher(self.teacher, recipe.run.quantize_base, self.rt.device,
                                   recipe.run.quantize_text_encoders)
        check_rewards(recipe)
        torch.manual_seed(recipe.seed)  # LoRA A matrices start random: the same seed, the same run
        if recipe.init_lora:
            lora.load_lora(unet, recipe.init_lora, lora.STUDENT)
        elif lora.STUDENT not in getattr(unet, "peft_config", {}):
            targets = lora.preset_for(unet, recipe.lora_targets)  # default "all" on a transformer: its preset
            lora.add_lora(unet, lora.lora_config(recipe.lora_rank, recipe.lora_alpha, targets), lora.STUDENT)
        lora.activate(unet, lora.STUDENT, trainable=(lora.STUDENT,))
        if quantized:
            quant.check_wrapped(unet)
        self._speed_up(unet)
        sharded = None
        if recipe.run.shard_base:  # after the LoRA is attached: its weights stay out of the shards
            sharded = shard.shard_teacher(self.teacher, self.rt.device, self.rt.world)
        self.data = self.backbone.training_data(opened, self.teacher)
        # each process draws its own batches and noise, and all of them the same step counts and branches
        self.generator, shared = run_streams(recipe.seed, self.rt.rank, self.rt.world)
        self.rng = RandomStreams(self.generator, self.rt, recipe.seed, shared)
        self.pieces = StateRegistry()  # what a checkpoint holds besides the adapters; stages add theirs
        self.pieces.register("rng", self.rng)
        self.pieces.register("scalers", self.rt)
        self._context: StageContext | None = None
        self._restored_from: Path | None = None  # the checkpoint a resume read
        with torch.no_grad():
            self.uncond_row = self.teacher.empty_cond(1)
        self.stats: dict = {"nan_skipped": 0, "stages": {}}
        if sharded:
            self.stats["shard_base"] = sharded
        data_stats, message = self.backbone.data_report(recipe, self.data)  # what the data could not serve
        if data_stats is not None:
            self.stats["data"] = data_stats
        if message and self.progress:
            tqdm.write(message)

    def _speed_up(self, unet) -> None:
        r = self.recipe
        if r.tf32 and self.rt.device.type == "cuda":
            speed.enable_tf32()
        if r.gradient_checkpointing:
            speed.gradient_checkpointing(unet)
        if r.channels_last:
            speed.channels_last(unet)
        if r.fp8_teacher:  # before compiling, so the compiled blocks trace the FP8 layers
            fp8.enable(unet)
        if r.compile:
            speed.compile_blocks(unet)

    @property
    def student(self) -> list[torch.nn.Parameter]:
        return lora.adapter_params(self.teacher.unet, lora.STUDENT)

    def stage_context(self) -> StageContext:
        """What the stages see of this run (one for the run: its roles and schedule are kept)."""
        if self._context is None:
            r = self.recipe
            self._context = StageContext(
                self.teacher, self.generator, self.uncond_row, self.rt, batch=self.batch, lora_meta=self.lora_meta,
                out=self.out, progress=self.progress, seed=r.seed, stages=r.stages, lora_rank=r.lora_rank,
                lora_alpha=r.lora_alpha, grad_clip=r.grad_clip, control=self.rng.shared,
                **preserved_cfg(r, self.teacher))
        return self._context

    # -- state -----------------------------------------------------------------------------
    def _save(self, stage_idx: int, step: int, global_step: int) -> None:
        states = self.pieces.state_dict()  # on every process: the random streams gather each one's own
        shard.reshard(self.teacher.unet)  # process 0's state dict below would reshard there alone
        if self.rt.is_main:  # the processes hold the same weights: one writes them
            self._write_checkpoint(stage_idx, step, global_step, states)
        self.rt.barrier()

    def _write_checkpoint(self, stage_idx, step, global_step, states: dict) -> None:
        unet = self.teacher.unet
        tensors, optim = split_states(states)
        tensors |= {f"lora-{n}": lora.get_state(unet, n) for n in unet.peft_config}
        state = {"format": FORMAT, "fingerprint": self.recipe.fingerprint(), "stage_idx": stage_idx, "step": step,
                 "global_step": global_step, "stats": self.stats, "bad_in_a_row": self.rt.guard.in_a_row,
                 "adapters": {n: lora.spec(unet, n) for n in unet.peft_config}, "active": lora.active(unet)}
        path = save_checkpoint(self.out / "checkpoints", global_step, tensors, optim, state, self.recipe.checkpoint_keep)
        self.log.write("checkpoint", path=str(path), stage_idx=stage_idx, step=step, global_step=global_step)

    def _restore(self):
        damaged = []

        def latest_checkpoint():
            return load_latest(self.out / "checkpoints", lambda msg: damaged.append(msg) or _warn(msg),
                               writer=self.rt.is_main)

        # process 0 first: it clears a killed save's leftovers and sets damaged folders aside, so the
        # others then list the same folders and every process resumes the same step
        latest = latest_checkpoint() if self.rt.is_main else None
        self.rt.barrier()
        if not self.rt.is_main:
            latest = latest_checkpoint()
        if latest is None:
            return None
        path, (tensors, optim, state) = latest
        if state["fingerprint"] != self.recipe.fingerprint():
            raise HypersdError(
                f"checkpoint {path} belongs to another recipe (fingerprint {state['fingerprint']} vs "
                f"{self.recipe.fingerprint()}); use the config it was made with, or a new --out")
        unet = self.teacher.unet
        for name in list(unet.peft_config):  # the UNet gets exactly the checkpoint's adapters
            if name not in state["adapters"]:
                lora.remove_lora(unet, name)
        for name, spec in state["adapters"].items():
            lora.ensure_lora(unet, name, **spec)
            lora.set_state(unet, tensors[f"lora-{name}"], name)
        # an added adapter becomes active (the fake score, say); a stage resumed inside sets its own
        # in enter(), and a finished run samples with the adapters it ended with (checkpoints that
        # predate the "active" record: the student with any feedback LoRA on it)
        lora.activate(unet, state.get("active") or [n for n in (lora.STUDENT, lora.FEEDBACK) if n in unet.peft_config],
                      trainable=(lora.STUDENT,))
        self.rng.step = state["global_step"]  # a process without a saved stream seeds a new one from it
        self.pieces.load_state_dict(saved_pieces(tensors, optim), f"checkpoint {path}")  # the run's own pieces
        self._restored_from = path
        self.stats = state["stats"]
        self.rt.guard.in_a_row = dict(state.get("bad_in_a_row", {}))
        if damaged:  # in stats.json too: a run that went back is worth knowing of afterwards
            self.stats.setdefault("damaged_checkpoints", []).extend(damaged)
        return tensors, optim, state

    # -- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False, max_steps: int | None = None) -> bool:
        """Run (or continue) every stage; False when stopped early by ``max_steps``."""
        restored = self._restore() if resume else None
        if resume and restored is None:  # a mistyped --out would otherwise silently train from scratch
            raise HypersdError(f"{self.out} has no run to resume (no checkpoints in {self.out / 'checkpoints'}); "
                               f"run without --resume to start one")
        stage_idx, start, global_step = 0, 0, 0
        if restored:
            _, _, state = restored
            stage_idx, start, global_step = state["stage_idx"], state["step"], state["global_step"]
        self.log.write("run_start", resume=bool(restored), stage_idx=stage_idx, step=start, global_step=global_step,
                       fingerprint=self.recipe.fingerprint(), processes=self.rt.world)
        budget = max_steps
        for i in range(stage_idx, len(self.recipe.stages)):
            stage = self.recipe.stages[i]
            resuming = bool(restored) and i == stage_idx and start > 0
            # Building a stage draws from torch's global RNG (new LoRA and head weights, a reward
            # model's layers): seed it per stage, and on a resume put back the checkpoint's state
            # after the build, so a resumed run draws what the uninterrupted one drew.
            torch.manual_seed(self.recipe.seed + 1000 * (i + 1))
            stats = self.stats["stages"].setdefault(stage.name, {})
            if not resuming:  # a new stage: new optimizers, nothing bad in a row yet
                self.rt.guard.in_a_row = {}
            self.rt.guard.at(stage.name, "0 (before its first step)", stats.setdefault("skipped", {}))
            run = stage_run(self.stage_context(), stage)
            run.enter(fresh=not resuming)
            if resuming:
                self.rng.resume_torch()
            if self.recipe.channels_last:  # the stage's new adapters too
                speed.channels_last(self.teacher.unet)
            opt = (speed.optimizer(run.params, stage.lr, self.recipe.optimizer, betas=stage.betas)
                   if run.params else None)
            pieces = ({"opt": opt} if opt else {}) | run.pieces()
            with self.pieces.scope(pieces):  # checkpointed while the stage runs
                if resuming:
                    tensors, optim, _ = restored
                    self.pieces.load_state_dict(saved_pieces(tensors, optim), f"checkpoint {self._restored_from}",
                                                names=pieces)
                else:
                    start = 0
                done, global_step = self._run_stage(i, stage, run, start, global_step, opt, budget)
            if not done:
                return False
            if budget is not None:
                budget -= stage.steps - start
            self._finish_stage(stage, run)
            self._save(i + 1, 0, global_step)
        return True

    def _run_stage(self, i, stage, run: StageRun, start, global_step, opt, budget):
        stats = self.stats["stages"][stage.name]
        bar = tqdm(range(start, stage.steps), desc=f"{stage.name}", disable=not self.progress or stage.steps == 0,
                   initial=start, total=stage.steps)
        self.log.write("stage_start", stage=stage.name, stage_kind=stage.kind, step=start, steps=stage.steps,
                       global_step=global_step, lr=stage.lr, batch=stage.batch)
        t0 = time.perf_counter()
        for step in bar:
            if budget is not None and step - start >= budget:
                return False, global_step
            t_step = time.perf_counter()
            z, prompts, cond = self.batch(stage.batch)
            if opt is not None and stage.lr_end is not None:
                set_lr(opt, stage_lr(stage, step))
            self.rt.guard.at(stage.name, f"{step + 1}/{stage.steps}")
            logs = train_step(self.rt, run, opt, z, prompts, cond, self.recipe.grad_clip)
            global_step += 1
            self._tally()
            self.log.step(stage.name, step + 1, global_step, logs, time.perf_counter() - t_step,
                          stats.get("skipped", {}))
            if logs is None:  # a non-finite student step: skipped, counted by the guard, nothing saved from it
                continue
            if step % 10 == 0:
                bar.set_postfix({k: f"{float(torch.as_tensor(v).detach()):.3g}" for k, v in logs.items()})
            if global_step % self.recipe.checkpoint_every == 0 and step + 1 < stage.steps:
                self._save(i, step + 1, global_step)
        stats["seconds"] = round(stats.get("seconds", 0) + time.perf_counter() - t0, 1)
        self.log.write("stage_end", stage=stage.name, global_step=global_step, seconds=stats["seconds"])
        return True, global_step

    def _tally(self) -> None:
        """stats.json's total of refused steps, over every stage and optimizer (each stage's
        ``skipped`` holds them by optimizer role)."""
        self.stats["nan_skipped"] = sum(sum(st.get("skipped", {}).values()) + st.get("nan_skipped", 0)
                                        for st in self.stats["stages"].values())

    def batch(self, n: int, generator: torch.Generator | None = None):
        """(latents, prompts, cond), as the backbone conditions them. ``generator``: the run's own by default."""
        return self.backbone.batch(self.data, self.teacher, n, generator or self.generator)

    def _finish_stage(self, stage: Stage, run: StageRun) -> None:
        d = self.out / "stages" / stage.name
        run.finish(d)  # on every process: a merge changes the adapters (the files written are identical)
        # a sharded base: every process makes the grids' network calls (each all-gathers); process 0 writes
        if self.recipe.eval.grid_every_stage and (self.rt.is_main or shard.is_sharded(self.teacher.unet)):
            k = getattr(stage, "segments", 1)
            grid = self.sample_grid(d / f"samples-{k}step.png", k, one_step_t=self.one_step_t(stage))
            self.log.write("samples", stage=stage.name, steps=k, path=str(grid))

    def lora_meta(self, stage: Stage) -> dict:
        meta = {"kind": "hypersd-lora", "stage": stage.name, "stage_kind": stage.kind, "guidance": 1.0,
                "backbone": self.recipe.backbone, "recipe": self.recipe.fingerprint(),
                **self.backbone.lora_fields(self.teacher)}  # FLUX: its guidance embedding, resolution
        ctx = self.stage_context()
        meta["cfg"] = ctx.cfg  # preserve: a CFG LoRA, sampled (two passes a step) at its guidance
        if ctx.cfg == "preserve":
            meta["guidance"] = ctx.cfg_guidance
        if hasattr(stage, "segments"):
            meta["segments"] = stage.segments
        one_step_t = self.one_step_t(stage)
        if one_step_t is not None:
            meta["one_step_t"] = one_step_t
        trained = self.trained_eta(stage)
        if trained:
            meta["trained_eta"] = trained
        return meta

    def trained_eta(self, stage: Stage) -> dict[str, float]:
        """The eta a multi-step DMD stage ran the student's k-step sampler at, per k > 1: the sampler
        those steps were trained for, and the one to use where no eta was measured (--no-eval)."""
        stages = self.recipe.stages[: self.recipe.stages.index(stage) + 1]
        dmd = [s for s in stages if s.kind == "dmd"]
        if not dmd or not dmd[-1].generator_eta:
            return {}
        return {str(k): dmd[-1].generator_eta for k in sorted(set(dmd[-1].generator_steps)) if k > 1}

    def one_step_t(self, stage: Stage) -> int | None:
        """The timestep a one-step sample takes once a DMD stage trained a generator elsewhere than T-1."""
        stages = self.recipe.stages[: self.recipe.stages.index(stage) + 1]
        dmd = [s for s in stages if s.kind == "dmd"]
        t = dmd[-1].generator_t if dmd else None
        return None if t is None or t == self.teacher.T - 1 else t

    def student_guidance(self) -> float:
        """What the student is sampled at: its CFG guidance under ``cfg: preserve``, else the backbone's."""
        return self.stage_context().cfg_guidance or self.backbone.student_guidance(self.teacher)

    @torch.no_grad()
    def sample_grid(self, path, steps: int, eta: float = 0.0, n: int | None = None, one_step_t: int | None = None):
        """The student's samples at ``steps`` on ``n`` of the backbone's grid prompts (its default count)."""
        from hypersd.core.sampling import sample_prompts

        prompts = self.backbone.grid_prompts(self.data, n or self.backbone.grid_samples)
        with lora.fused(self.teacher.unet):
            x = sample_prompts(self.teacher, prompts, steps, guidance=self.student_guidance(),
                               eta=eta, seed=0, one_step_t=one_step_t)
        shard.reshard(self.teacher.unet)
        if not self.rt.is_main:  # a sharded base's other processes: they sampled along, process 0 writes
            return path
        return self.backbone.save_grid(self.teacher, x, prompts, path)

    def finish(self) -> Path:
        """The final LoRA (the last stage's) at ``out/lora.safetensors``, with sample grids."""
        last = self.recipe.stages[-1]
        if self.rt.world > 1:
            if not self.rt.same_everywhere(self.student):
                raise HypersdError(f"the {self.rt.world} processes ended with different LoRA weights; "
                                   f"report this with the recipe (hypersd distill --dry-run)")
            self.stats["processes"] = self.rt.world
        if not self.rt.is_main:
            if shard.is_sharded(self.teacher.unet):  # process 0's grids all-gather the base's shards from every process
                for k in self.recipe.eval.steps:
                    self.sample_grid(self.out / f"samples-{k}step.png", k, one_step_t=self.one_step_t(last))
            return self.out / "lora.safetensors"
        state, spec = current_lora(self.teacher.unet)
        meta = {**self.lora_meta(last), **spec}
        self.backbone.annotate_lora(self, state, meta)  # digits: the recommended etas, by its judges
        path = lora.save_state(self.out / "lora.safetensors", state, meta)
        etas = {int(k): v for k, v in meta.get("recommended_eta", {}).items()}
        for k in self.recipe.eval.steps:
            grid = self.sample_grid(self.out / f"samples-{k}step.png", k, eta=etas.get(k, 0.0),
                                    one_step_t=self.one_step_t(last))
            self.log.write("samples", stage=last.name, steps=k, eta=etas.get(k, 0.0), path=str(grid))
        for label, grid in self.backbone.final_grids(self, etas, self.one_step_t(last)):
            self.log.write("samples", stage=last.name, steps=label, path=str(grid))
        write_text(self.out / "stats.json", json.dumps(self.stats, indent=1))
        self.log.write("run_end", lora=str(path), nan_skipped=self.stats["nan_skipped"])
        self.log.close()
        return path
