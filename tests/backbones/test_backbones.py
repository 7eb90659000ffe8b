"""Backbones: the registry, and a trainer that runs whatever backbone is registered, knowing none."""

import pytest
import torch

from hypersd import backbones
from hypersd.backbones import Backbone, get_backbone
from hypersd.cli import main
from hypersd.errors import HypersdError
from hypersd.eval.grid import save_grid
from hypersd.lora import read_lora
from hypersd.train.recipe import from_dict


def test_an_unknown_backbone_is_refused_with_the_known_ones():
    with pytest.raises(HypersdError, match=r"unknown backbone 'sd9'; choose one of digits, digits-flow, sd15, sdxl, sd3, flux"):
        get_backbone("sd9")
    with pytest.raises(HypersdError, match=r"unknown backbone 'sd9'; choose one of digits, digits-flow, sd15, sdxl, sd3, flux"):
        from_dict({"backbone": "sd9", "stages": [{"name": "t", "segments": 2}]})  # at load, before any model


def test_a_backbone_refuses_the_precisions_its_teacher_cannot_train_at():
    stages = [{"name": "t", "segments": 2}]
    with pytest.raises(HypersdError, match="digits teacher trains in float32 or bf16"):
        from_dict({"backbone": "digits", "mixed_precision": "fp16", "stages": stages})
    assert from_dict({"backbone": "sd15", "run": {"mixed_precision": "fp16"}, "stages": stages}).run.mixed_precision \
        == "fp16"


class RandomData:
    """Latents of noise around two fixed patterns, one prompt each: data no shipped backbone has."""

    prompts = ["a handwritten digit zero", "a handwritten digit one"]

    def __init__(self, teacher):
        self.patterns = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(5))
        self.draws = 0

    def batch(self, n, generator):
        self.draws += 1
        idx = torch.randint(0, 2, (n,), generator=generator)
        return self.patterns[idx] + 0.1 * torch.randn(self.patterns[idx].shape, generator=generator), \
            [self.prompts[i] for i in idx]


class TinyBackbone(Backbone):
    """A backbone defined here only: its teacher is a digits network, everything else its own."""

    name = "tiny"
    grid_samples = 4

    def __init__(self):
        self.grids, self.data = [], None

    def load_teacher(self, recipe, device, dtype):
        from hypersd.teachers.digits import DigitsTeacher

        return DigitsTeacher.load(recipe.teacher, device=device)

    def training_data(self, opened, teacher):
        self.data = RandomData(teacher)
        return self.data

    def grid_prompts(self, data, n):
        return (data.prompts * n)[:n]

    def save_grid(self, teacher, latents, prompts, path):
        self.grids.append((path.name, len(prompts)))
        return save_grid(teacher.decode(latents), path, ncol=2)

    def annotate_lora(self, distiller, state, meta):
        meta["tiny_draws"] = self.data.draws

    def evaluate(self, distiller, final):
        return f"tiny report on {final.name}"


def test_the_trainer_runs_a_backbone_registered_elsewhere(tmp_path, random_teacher_file, monkeypatch, capsys):
    tiny = TinyBackbone()
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"backbone: tiny\nteacher: {random_teacher_file}\nlora_rank: 4\neval: {{steps: [1, 2]}}\n"
                   "stages:\n  - {name: s, segments: 2, steps: 2, batch: 4}\n")
    main(["distill", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    assert tiny.data.draws == 2  # every training batch came from the backbone's data
    # a grid after the stage and one per eval step count, each of the backbone's own size and writer
    assert tiny.grids == [("samples-2step.png", 4), ("samples-1step.png", 4), ("samples-2step.png", 4)]
    assert (tmp_path / "run" / "stages" / "s" / "samples-2step.png").is_file()
    assert not (tmp_path / "run" / "compare.png").exists()  # the digits world's comparison is digits' own
    _, meta = read_lora(tmp_path / "run" / "lora.safetensors")
    assert meta["backbone"] == "tiny" and meta["tiny_draws"] == 2 and "recommended_eta" not in meta
    assert "tiny report on lora.safetensors" in capsys.readouterr().out  # distill printed its evaluation
