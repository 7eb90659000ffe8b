"""Stable Diffusion 1.5 and SDXL: a diffusers teacher trained from a latent cache (``hypersd cache``)."""

from __future__ import annotations

from pathlib import Path

from hypersd.backbones.base import Backbone
from hypersd.errors import HypersdError
from hypersd.outputs import write_text


class SDBackbone(Backbone):
    grid_samples = 8

    def __init__(self, name: str):
        self.name = name

    def open_data(self, recipe):
        from hypersd.data.cache import CachedData

        if not recipe.data:
            raise HypersdError(f"distilling backbone {recipe.backbone!r} needs its data pipeline: set data: to a "
                               f"folder written by 'hypersd cache --backbone {recipe.backbone} --model M --data SRC "
                               f"--out DIR' (or --set data=DIR)")
        cached = CachedData(recipe.data, recipe.backbone)
        made_at = cached.manifest["resolution"]
        if recipe.resolution and made_at != recipe.resolution:
            raise HypersdError(f"cache {recipe.data} was made at resolution {made_at}, the recipe trains at "
                               f"{recipe.resolution}; cache the data with --resolution {recipe.resolution}")
        return cached

    def load_teacher(self, recipe, device, dtype):
        from hypersd.teachers.sd import load_sd

        if not recipe.teacher:
            raise HypersdError(f"backbone {self.name!r} needs a model: pass a hub id or a local diffusers folder")
        if recipe.teacher_config:
            raise HypersdError(f"teacher_config names the diffusers folder of an sd3 or flux checkpoint file; "
                               f"{self.name} distils from a diffusers folder or hub id: drop teacher_config")
        return load_sd(self.name, recipe.teacher, device=device, dtype=dtype)

    def adapt_teacher(self, recipe, teacher) -> None:
        if recipe.vae:
            from hypersd.teachers.sd import replace_vae

            replace_vae(teacher, recipe.vae)

    def training_data(self, opened, teacher):
        return opened.attach(teacher)

    def data_report(self, recipe, data):
        from hypersd.data.cache import describe_skips

        message = f"cache {recipe.data}: {len(data)} items; skipped {describe_skips(data.skipped)}"
        stats = {"items": len(data), "skipped": dict(data.skipped)}
        if data.sampler is not None:  # aspect-ratio buckets: what each holds, every batch of one
            stats["buckets"] = data.bucket_counts()
        return stats, message if data.skipped else None

    def batch(self, data, teacher, n, generator):
        return data.batch_cond(n, generator)  # the cache holds the conditioning: no text encoder per step

    def grid_prompts(self, data, n: int) -> list[str]:
        captions = data.captions  # a few of the data's own captions
        return captions[::max(1, len(captions) // n)][:n]

    def save_grid(self, teacher, latents, prompts, path) -> Path:
        import torch

        from hypersd.eval.grid import save_grid

        write_text(Path(path).with_suffix(".txt"), "\n".join(prompts) + "\n")  # beside the images, in grid order
        # one image at a time; the VAE's attention over eight 1024-pixel images at once asked for
        # 8 GiB more than an 80 GB GPU had left after SDXL training
        images = torch.cat([teacher.decode(v) for v in latents.split(1)])
        return save_grid(images, path, ncol=4, scale=1)

    def evaluate(self, distiller, final: Path) -> str:
        return f"no metrics: they are the digits world's; the samples are in {distiller.out}/samples-*step.png"
