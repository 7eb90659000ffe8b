"""SD3 / SD3.5 and FLUX.1: rectified-flow transformer teachers trained from a latent cache.

They are the SD backbones' data pipeline (``hypersd cache --backbone sd3|flux``: 16-channel latents,
the prompts' sequence and pooled vector) with another teacher loader. Their schedule is the loaded
model's (the shift of its scheduler config; FLUX's that of the training resolution's token count),
so ``named_schedule`` is None and the trainer checks the recipe's grids on the teacher it loaded.
"""

from __future__ import annotations

from pathlib import Path

from hypersd.backbones.sd import SDBackbone
from hypersd.errors import HypersdError


class FlowBackbone(SDBackbone):
    # no float16: FLUX's activations overflow it (its pipelines run in bf16); SD3 has not been tried at it
    mixed_precisions = ("no", "bf16")

    def named_schedule(self):
        return None

    def load_teacher(self, recipe, device, dtype):
        from hypersd.teachers import load_teacher

        if not recipe.teacher:
            raise HypersdError(f"backbone {self.name!r} needs a model: pass a hub id, a local diffusers folder or a "
                               f".safetensors checkpoint")
        options = self.teacher_options(recipe)
        if recipe.teacher_config:
            if not Path(str(recipe.teacher)).expanduser().is_file():
                raise HypersdError(f"teacher_config names the diffusers folder of a single-file teacher, but teacher "
                                   f"{recipe.teacher} is no file (a folder or hub id holds its own configs): drop "
                                   f"teacher_config")
            options["config"] = recipe.teacher_config
        return load_teacher(self.name, recipe.teacher, device=device, dtype=dtype, **options)

    def lora_fields(self, teacher) -> dict:
        """The T5 length the LoRA was trained with: 'hypersd generate' encodes prompts at it."""
        return {"max_sequence_length": teacher.max_sequence_length}

    def teacher_options(self, recipe) -> dict:
        """The T5 length the cache was encoded with: its sequences are the teacher's only at it."""
        length = _manifest(recipe).get("t5_length")
        return {"max_sequence_length": length} if length else {}


class FluxBackbone(FlowBackbone):
    def check_recipe(self, recipe, source: str) -> None:
        """No ``cfg: preserve``: FLUX.1-dev has no real CFG to keep (its guidance is an embedding it
        was distilled into, it has no trained unconditional branch), and schnell none at all."""
        super().check_recipe(recipe, source)
        if recipe.cfg == "preserve":
            raise HypersdError(f"{source}: cfg: preserve trains a LoRA to be sampled with real classifier-free "
                               f"guidance, which FLUX.1 does not use (dev takes guidance as an embedding in one "
                               f"pass, schnell takes none); use cfg: bake, with the stages' guidance range for "
                               f"dev's embedding (docs/METHOD.md, 'CFG-preserving LoRAs')")

    def teacher_options(self, recipe) -> dict:
        # the shift is that of the training images' token count: the cache's resolution
        resolution = recipe.resolution or _manifest(recipe)["resolution"]
        return {**super().teacher_options(recipe), "resolution": resolution}

    def adapt_teacher(self, recipe, teacher) -> None:
        """Refuse a DMD guidance other than dev's embedding: the teacher's one guided pass records
        its ω as ``teacher.guidance``, which the student's calls embed too, so the student would be
        trained on one embedding in TSCD and another from DMD on."""
        super().adapt_teacher(recipe, teacher)
        if not teacher.guidance_embeds:
            return
        for s in recipe.stages:
            if s.kind == "dmd" and s.guidance is not None and s.guidance != teacher.guidance:
                raise HypersdError(f"stage {s.name!r}: guidance {s.guidance:g} would become the student's guidance "
                                   f"embedding mid-run (FLUX.1-dev's teacher and student share it, "
                                   f"{teacher.guidance:g}); leave guidance unset")

    def student_guidance(self, teacher) -> float:
        """dev: the guidance embedding the student is trained with (its calls go through ``eps``,
        which embeds ``teacher.guidance``); 1.0 would be another embedding, not "no CFG"."""
        return teacher.guidance if teacher.guidance_embeds else 1.0

    def lora_fields(self, teacher) -> dict:
        """Also the student's guidance embedding, the resolution its shift belongs to, and the T its
        timesteps count on (``one_step_t``: FLUX's T was 1000 before ``FLUX_T``)."""
        return {**super().lora_fields(teacher), "guidance": self.student_guidance(teacher),
                "resolution": list(teacher.resolution), "T": teacher.T}


def _manifest(recipe) -> dict:
    """The manifest of the recipe's cache (``open_data`` has read and checked it already)."""
    from hypersd.data.cache import read_manifest

    return read_manifest(recipe.data)
