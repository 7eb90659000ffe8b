"""The trainer loop: runs a recipe's stages in order, checkpointing, resuming, evaluating.

The loop knows nothing of any one method: each stage kind builds its loss from the stage's
config, and the loop only steps optimizers, keeps the EMA target, and writes files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import lora
from .adversarial import Discriminator, DiscriminatorHeads, hinge_d_loss, hinge_g_loss
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .errors import HypersdError
from .outputs import write_text
from .recipe import Recipe, Stage
from .teachers import load_teacher
from .tscd import ConsistencyConfig, ConsistencyStep


class DigitsData:
    """Training batches from the digits train split: (latents, prompts)."""

    def __init__(self, teacher):
        from .digits import data

        self.x, self.y = data.load("train")
        self.teacher, self.prompts_for = teacher, data.prompts_for

    def batch(self, n: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.x), (n,), generator=generator)
        return self.teacher.encode(self.x[idx]).to(self.teacher.device), self.prompts_for(self.y[idx])


def default_guidance_range(teacher) -> list[float]:
    w = teacher.default_guidance
    return [max(1.0, 0.75 * w), 1.25 * w] if w > 1 else [1.0, 1.0]


class Distiller:
    def __init__(self, recipe: Recipe, out_dir: str | Path, progress: bool = True, teacher=None):
        self.recipe, self.out, self.progress = recipe, Path(out_dir), progress
        if recipe.backbone != "digits":  # refuse before loading a large model
            raise HypersdError(f"distilling backbone {recipe.backbone!r} needs its data pipeline, not yet "
                               f"available; the digits backbone runs today")
        self.teacher = teacher or load_teacher(recipe.backbone, recipe.teacher)
        unet = self.teacher.unet
        unet.requires_grad_(False)
        cfg = lora.lora_config(recipe.lora_rank, recipe.lora_alpha, recipe.lora_targets)
        torch.manual_seed(recipe.seed)  # LoRA A matrices start random: the same seed, the same run
        for name in (lora.STUDENT, lora.EMA):
            if name not in getattr(unet, "peft_config", {}):
                lora.add_lora(unet, cfg, name)
        unet.set_adapter(lora.STUDENT)
        for p in lora.adapter_params(unet, lora.EMA):
            p.requires_grad_(False)
        self.student = lora.adapter_params(unet, lora.STUDENT)
        self.ema = lora.adapter_params(unet, lora.EMA)
        self.data = DigitsData(self.teacher)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        with torch.no_grad():
            self.uncond_row = self.teacher.empty_cond(1)
        self.stats: dict = {"nan_skipped": 0, "stages": {}}

    # -- state -----------------------------------------------------------------------------
    def _stage_objects(self, stage: Stage):
        guidance = stage.guidance or default_guidance_range(self.teacher)
        step = ConsistencyStep(self.teacher, ConsistencyConfig(
            segments=stage.segments, end=stage.end, boundary_prob=stage.boundary_prob, guidance=tuple(guidance), distance=stage.distance,
            huber_c=stage.huber_c, offset_noise=stage.offset_noise, solver_steps=stage.solver_steps))
        opt = torch.optim.AdamW(self.student, lr=stage.lr, weight_decay=0.0)
        disc = d_opt = None
        if stage.adv_weight > 0:
            heads = DiscriminatorHeads.for_unet(self.teacher.unet, stage.d_hidden).to(self.teacher.device)
            disc = Discriminator(self.teacher.unet, heads)
            d_opt = torch.optim.AdamW(heads.parameters(), lr=stage.d_lr, betas=(0.0, 0.99))
        return step, opt, disc, d_opt

    def _save(self, stage_idx: int, step: int, global_step: int, opt, disc, d_opt) -> None:
        tensors = {"student": lora.get_state(self.teacher.unet, lora.STUDENT),
                   "ema": lora.get_state(self.teacher.unet, lora.EMA),
                   "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}}
        optim = {"opt": opt.state_dict() if opt else None}
        if disc is not None:
            tensors["heads"] = disc.heads.state_dict()
            optim["d_opt"] = d_opt.state_dict()
        state = {"fingerprint": self.recipe.fingerprint(), "stage_idx": stage_idx, "step": step,
                 "global_step": global_step, "stats": self.stats}
        save_checkpoint(self.out / "checkpoints", global_step, tensors, optim, state, self.recipe.checkpoint_keep)

    def _restore(self):
        ckpts = list_checkpoints(self.out / "checkpoints")
        if not ckpts:
            return None
        tensors, optim, state = load_checkpoint(ckpts[-1])
        if state["fingerprint"] != self.recipe.fingerprint():
            raise HypersdError(
                f"checkpoint {ckpts[-1]} belongs to another recipe (fingerprint {state['fingerprint']} vs "
                f"{self.recipe.fingerprint()}); use the config it was made with, or a new --out")
        lora.set_state(self.teacher.unet, tensors["student"], lora.STUDENT)
        lora.set_state(self.teacher.unet, tensors["ema"], lora.EMA)
        self.generator.set_state(tensors["rng"]["generator"])
        torch.set_rng_state(tensors["rng"]["torch"])
        self.stats = state["stats"]
        return tensors, optim, state

    # -- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False, max_steps: int | None = None) -> bool:
        """Run (or continue) every stage; False when stopped early by ``max_steps``."""
        restored = self._restore() if resume else None
        stage_idx, start, global_step = 0, 0, 0
        if restored:
            _, _, state = restored
            stage_idx, start, global_step = state["stage_idx"], state["step"], state["global_step"]
        budget = max_steps
        for i in range(stage_idx, len(self.recipe.stages)):
            stage = self.recipe.stages[i]
            step_fn, opt, disc, d_opt = self._stage_objects(stage)
            if restored and i == stage_idx and start > 0:
                tensors, optim, _ = restored
                opt.load_state_dict(optim["opt"])
                if disc is not None:
                    disc.heads.load_state_dict(tensors["heads"])
                    d_opt.load_state_dict(optim["d_opt"])
            else:
                start = 0
                with torch.no_grad():  # a stage's target starts as its student
                    torch._foreach_copy_(self.ema, self.student)
            done, global_step = self._run_stage(i, stage, start, global_step, step_fn, opt, disc, d_opt, budget)
            if not done:
                return False
            if budget is not None:
                budget -= stage.steps - start
            self._finish_stage(i, stage)
            self._save(i + 1, 0, global_step, None, None, None)
        return True

    def _run_stage(self, i, stage, start, global_step, step_fn, opt, disc, d_opt, budget):
        rec = self.recipe
        stats = self.stats["stages"].setdefault(stage.name, {"nan_skipped": 0})
        bar = tqdm(range(start, stage.steps), desc=f"{stage.name}", disable=not self.progress,
                   initial=start, total=stage.steps)
        t0 = time.perf_counter()
        for step in bar:
            if budget is not None and step - start >= budget:
                return False, global_step
            z, prompts = self.data.batch(stage.batch, self.generator)
            with torch.no_grad():
                cond = self.teacher.encode_prompt(prompts)
            uncond = self.uncond_row.repeat(stage.batch)
            pred, tgt, t_end = step_fn(z, cond, uncond, self.generator)
            mse = step_fn.loss(pred, tgt)
            loss = stage.mse_weight * mse
            if disc is not None:
                g_adv = hinge_g_loss(disc(pred, t_end, cond))
                loss = loss + stage.adv_weight * g_adv
            global_step += 1
            if not math.isfinite(loss.item()):  # skip, count, and never save from it
                stats["nan_skipped"] += 1
                self.stats["nan_skipped"] += 1
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student, rec.grad_clip)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.student, 1 - stage.ema_decay)
            if disc is not None:
                d_loss = hinge_d_loss(disc(tgt, t_end, cond), disc(pred.detach(), t_end, cond))
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
            if step % 10 == 0:
                post = {"mse": f"{mse.item():.2e}"}
                if disc is not None:
                    post |= {"g": f"{g_adv.item():.2f}", "d": f"{d_loss.item():.2f}"}
                bar.set_postfix(post)
            if global_step % rec.checkpoint_every == 0 and step + 1 < stage.steps:
                self._save(i, step + 1, global_step, opt, disc, d_opt)
        stats["seconds"] = round(stats.get("seconds", 0) + time.perf_counter() - t0, 1)
        return True, global_step

    def _finish_stage(self, i: int, stage: Stage) -> None:
        d = self.out / "stages" / stage.name
        lora.save_lora(d / "lora.safetensors", self.teacher.unet, self.lora_meta(stage))
        if self.recipe.grid_every_stage:
            self.sample_grid(d / f"samples-{stage.segments}step.png", stage.segments)

    def lora_meta(self, stage: Stage) -> dict:
        return {"kind": "hypersd-lora", "stage": stage.name, "segments": stage.segments, "guidance": 1.0,
                "backbone": self.recipe.backbone, "recipe": self.recipe.fingerprint()}

    @torch.no_grad()
    def sample_grid(self, path, steps: int, eta: float = 0.0, n: int = 100):
        from .digits.data import balanced_labels, prompts_for
        from .grid import save_grid
        from .sampling import sample_prompts

        x = sample_prompts(self.teacher, prompts_for(balanced_labels(n)), steps, guidance=1.0, eta=eta, seed=0)
        return save_grid(self.teacher.decode(x), path)

    def stage_loras(self) -> dict[int, Path]:
        """Step count -> the LoRA of the last stage trained for that many segments."""
        return {s.segments: self.out / "stages" / s.name / "lora.safetensors" for s in self.recipe.stages
                if (self.out / "stages" / s.name / "lora.safetensors").is_file()}

    def finish(self) -> Path:
        """The final LoRA (the last stage's) at ``out/lora.safetensors``, with sample grids."""
        last = self.recipe.stages[-1]
        path = lora.save_lora(self.out / "lora.safetensors", self.teacher.unet, self.lora_meta(last))
        for k in self.recipe.eval_steps:
            self.sample_grid(self.out / f"samples-{k}step.png", k)
        write_text(self.out / "stats.json", json.dumps(self.stats, indent=1))
        return path
