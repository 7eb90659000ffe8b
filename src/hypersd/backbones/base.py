"""``Backbone``: what one model family brings to a run, so the trainer knows none by name.

A backbone loads the frozen teacher, serves the training batches and their conditioning, picks
the prompts of a sample grid and writes it, and evaluates the final LoRA. The trainer calls only
these methods; a new model family (SD3, FLUX, a flow-matching digits world) is one new module
that subclasses ``Backbone`` and registers itself in ``hypersd.backbones``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hypersd.errors import HypersdError


class Backbone:
    """The defaults are those of an image backbone trained from a latent cache; subclasses
    override what differs."""

    name: str = ""
    grid_samples: int = 8  # images in a sample grid
    mixed_precisions: tuple[str, ...] = ("no", "bf16", "fp16")  # what the frozen teacher may run at

    def named_schedule(self):
        """The teacher's noise schedule where the backbone alone fixes it (the DDPM backbones: T = 1000,
        trailing), so a recipe's grids are checked as it loads; None where only the loaded teacher
        knows it (a flow model's shift): the trainer checks them then."""
        from diffusers import DDPMScheduler

        from hypersd.core.noise import DDPMSchedule

        return DDPMSchedule(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.float())

    def check_recipe(self, recipe, source: str) -> None:
        """Refuse, at load, the recipe settings this backbone cannot train with."""
        if recipe.run.mixed_precision not in self.mixed_precisions:
            raise HypersdError(f"{source}: the {self.name} teacher trains at mixed_precision "
                               f"{' or '.join(self.mixed_precisions)}, not {recipe.run.mixed_precision}")

    def open_data(self, recipe):
        """The training data's handle, read and checked before any model loads (a wrong cache
        should not cost a large model's load); passed to ``training_data`` later; None where there is nothing to open."""

    def teacher_dtype(self, rt) -> torch.dtype | None:
        """The frozen teacher's weights' dtype under the runtime ``rt``; None: float32."""
        return rt.dtype

    def load_teacher(self, recipe, device, dtype):
        raise NotImplementedError

    def adapt_teacher(self, recipe, teacher) -> None:
        """The recipe's changes to the teacher, loaded or given (SD: its ``vae``)."""

    def training_data(self, opened, teacher):
        """The source of ``batch``'s draws, checked against the loaded teacher."""
        raise NotImplementedError

    def data_report(self, recipe, data) -> tuple[dict | None, str | None]:
        """(for stats.json, for the console) about the data: what it holds and could not serve;
        None where there is nothing to say."""
        return None, None

    def batch(self, data, teacher, n: int, generator: torch.Generator):
        """(latents, prompts, cond): ``n`` training items and their conditioning; by default the
        teacher's prompt encoder conditions the prompts."""
        z, prompts = data.batch(n, generator)
        with torch.no_grad():
            return z, prompts, teacher.encode_prompt(prompts)

    def student_guidance(self, teacher) -> float:
        """The guidance the student is sampled with: 1.0 (no CFG) where it was distilled from CFG."""
        return 1.0

    def grid_prompts(self, data, n: int) -> list[str]:
        """The prompts of a sample grid of ``n`` images."""
        raise NotImplementedError

    def save_grid(self, teacher, latents: torch.Tensor, prompts: list[str], path) -> Path:
        """Decode the grid's samples and write the image to ``path``."""
        raise NotImplementedError

    def lora_fields(self, teacher) -> dict:
        """What every LoRA file of a run records for 'hypersd generate' to sample it as it was trained."""
        return {}

    def annotate_lora(self, distiller, state: dict, meta: dict) -> None:
        """Add what this backbone measures about the final LoRA to its metadata (``meta``)."""

    def final_grids(self, distiller, etas: dict[int, float], one_step_t: int | None) -> list[tuple[str, Path]]:
        """Grids written beside the per-step-count samples at the end of a run, as (label, path)."""
        return []

    def evaluate(self, distiller, final: Path) -> str:
        """The end-of-run evaluation of the final LoRA ``final``: a report to print."""
        return f"no metrics for the {self.name} backbone; the samples are in {distiller.out}/samples-*step.png"
