"""The digits world: an 8x8 pixel teacher trained on the bundled digits, judged by the digits judges.

``digits`` is the DDPM UNet teacher; ``digits-flow`` the rectified-flow transformer teacher, the
same world otherwise (data, prompts, judges, grids).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hypersd import lora
from hypersd.backbones.base import Backbone
from hypersd.errors import HypersdError


class DigitsData:
    """Training batches from the digits train split: (latents, prompts)."""

    def __init__(self, teacher):
        from hypersd.digits import data

        self.x, self.y = data.load("train")
        self.teacher, self.prompts_for = teacher, data.prompts_for

    def batch(self, n: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.x), (n,), generator=generator)
        return self.teacher.encode(self.x[idx]).to(self.teacher.device), self.prompts_for(self.y[idx])


class DigitsBackbone(Backbone):
    name = "digits"
    grid_samples = 100
    mixed_precisions = ("no", "bf16")  # autocast lowers the float32 teacher's matmuls; fp16 would overflow

    def check_recipe(self, recipe, source: str) -> None:
        if recipe.run.mixed_precision not in self.mixed_precisions:
            raise HypersdError(f"{source}: the {self.name} teacher trains in float32 or bf16; use mixed_precision: "
                               f"bf16 or no")
        if recipe.run.shard_base:  # its judges and compare grids run the student on process 0 alone
            raise HypersdError(f"{source}: the {self.name} teacher is not sharded (it fits any card); set shard_base: false")

    def open_data(self, recipe):
        if recipe.data or recipe.resolution or recipe.vae:
            raise HypersdError(f"data, resolution and vae are for the sd15 and sdxl backbones; {recipe.backbone} "
                               f"trains on its own data: leave them unset")

    def teacher_dtype(self, rt):
        return None  # a float32 teacher at any precision: autocast lowers its matmuls

    def load_teacher(self, recipe, device, dtype):
        from hypersd.teachers.digits import DigitsTeacher

        return DigitsTeacher.load(recipe.teacher, device=device)

    def training_data(self, opened, teacher):
        return DigitsData(teacher)

    def grid_prompts(self, data, n: int) -> list[str]:
        from hypersd.digits.data import balanced_labels, prompts_for

        return prompts_for(balanced_labels(n))

    def save_grid(self, teacher, latents, prompts, path) -> Path:
        from hypersd.eval.grid import save_grid

        return save_grid(teacher.decode(latents), path)

    def annotate_lora(self, distiller, state: dict, meta: dict) -> None:
        meta["recommended_eta"] = recommended_etas(distiller, state, meta)  # measured by the digits judges

    def final_grids(self, distiller, etas, one_step_t):
        return [("compare", compare_grid(distiller, distiller.out / "compare.png", etas, one_step_t))]

    def evaluate(self, distiller, final: Path) -> str:
        from hypersd.eval.digits import distill_report

        return distill_report(distiller.teacher, final, distiller.out, distiller.recipe.eval)


def recommended_etas(d, state: dict, meta: dict) -> dict[str, float]:
    """{step count: eta} for the final LoRA, of the recipe's eval etas, by the judges on a seed
    no table reports (evaluation.recommend_etas). A finished run's file that already holds it
    for these very weights is not measured again."""
    from hypersd.eval.digits import ETA_TUNE_N, DigitsBench, recommend_etas

    ev = d.recipe.eval
    old = d.out / "lora.safetensors"
    if old.is_file():
        try:
            had, had_meta = lora.read_lora(old)
        except HypersdError:
            had, had_meta = {}, {}
        same = had.keys() == state.keys() and all(torch.equal(had[k], state[k].cpu()) for k in state)
        steps = {str(k) for k in ev.steps}
        if same and set(had_meta.get("recommended_eta") or {}) == steps \
                and had_meta.get("recommended_from") == ev.etas:
            meta["recommended_from"] = had_meta["recommended_from"]
            return had_meta["recommended_eta"]
    bench = DigitsBench(d.teacher, n=ev.n, seeds=range(ev.seeds), progress=d.progress)
    picks, scan = recommend_etas(bench, ev.steps, ev.etas, meta.get("guidance", 1.0),  # a CFG LoRA's, else 1
                                 one_step_t=meta.get("one_step_t"), n=min(ETA_TUNE_N, ev.n))
    meta["recommended_from"] = list(ev.etas)
    d.stats["eta_scan"] = {str(k): v for k, v in scan.items()}
    return {str(k): v for k, v in picks.items()}


@torch.no_grad()
def compare_grid(d, path, etas: dict[int, float], one_step_t: int | None, n: int = 20):
    """The teacher's 40 steps, then the LoRA at each eval step count, from the same noise and
    prompts: what the distillation bought, at a glance."""
    from hypersd.core.sampling import sample_prompts
    from hypersd.digits.data import balanced_labels, prompts_for
    from hypersd.eval import digits as evaluation
    from hypersd.eval.grid import save_rows

    prompts, t, ref = prompts_for(balanced_labels(n)), d.teacher, evaluation.REFERENCE_STEPS
    # the same teacher's 40 steps in every run's grid: from the references cache the benches share
    blocks = [(f"teacher {t.schedule.sampler}\n{ref} steps", evaluation.teacher_images(t, n, ref, seed=0))]
    with lora.fused(t.unet):
        for k in d.recipe.eval.steps:
            x = sample_prompts(t, prompts, k, guidance=d.student_guidance(), eta=etas.get(k, 0.0), seed=0,
                               one_step_t=one_step_t)
            blocks.append((f"LoRA\n{k} step{'s' * (k > 1)}\neta {etas.get(k, 0.0):g}", t.decode(x)))
    return save_rows(blocks, path)


class FlowDigitsBackbone(DigitsBackbone):
    """The digits world on the rectified-flow transformer teacher (``teacher-flow.safetensors``)."""

    name = "digits-flow"

    def named_schedule(self):
        return None  # the file's metadata holds the schedule: checked once the teacher loads

    def load_teacher(self, recipe, device, dtype):
        from hypersd.teachers.digits_flow import FlowDigitsTeacher

        return FlowDigitsTeacher.load(recipe.teacher, device=device)
