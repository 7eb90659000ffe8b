"""hypersd distill on tiny SD1.5 / SDXL teachers, trained from a latent cache."""

import json

import pytest
import torch
import yaml
from sd_tiny import _text_config, _vae, save_tiny, tiny_tokenizer
from test_imagedata import write_folder
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from hypersd import lora
from hypersd.cli import main
from hypersd.data.cache import build_cache
from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher
from hypersd.train.recipe import from_dict, load_recipe
from hypersd.train.trainer import Distiller


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """For each kind: (model folder, cache folder made from it)."""
    root = tmp_path_factory.mktemp("sd")
    write_folder(root / "images", n_good=6)
    out = {}
    for kind in ("sd15", "sdxl"):
        model = str(save_tiny(kind, root / kind))
        build_cache(kind, model, str(root / "images"), root / f"cache-{kind}", teacher=load_teacher(kind, model),
                    progress=False)
        out[kind] = (model, root / f"cache-{kind}")
    return out


@pytest.fixture(scope="module")
def clip_reward(tmp_path_factory):
    """A tiny random CLIP saved as a transformers folder: the feedback stage's reward."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=_text_config(tokenizer).to_dict(), vision_config=vision,
                         projection_dim=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return str(folder)


def _recipe(kind, setup, **kw) -> dict:
    model, cache = setup[kind]
    return {"backbone": kind, "teacher": model, "data": str(cache), "resolution": 16, "lora_rank": 4,
            "grid_every_stage": False, "eval_steps": [1, 2], "checkpoint_every": 100,
            "stage_defaults": {"batch": 2, "steps": 2}, "stages": [{"name": "t2", "segments": 2}], **kw}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_distill_runs_every_stage_kind_from_the_cache(kind, setup, clip_reward, tmp_path, capsys):
    stages = [{"name": "t2", "segments": 2}, {"name": "t1", "segments": 1},
              {"name": "fb", "kind": "feedback", "rewards": [{"name": "clip", "path": clip_reward, "weight": 0.1}],
               "sample_steps": [1, 2]},
              {"name": "m", "kind": "merge", "ratio": 0.5},
              {"name": "d", "kind": "dmd", "fake_warmup": 1, "fake_updates": 1, "reg_pool": 2, "reg_steps": 2,
               "reg_batch": 1, "keep_weight": 1.0, "keep_batch": 2}]
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(kind, setup, stages=stages)))
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "no metrics" in said and not (out / "metrics.json").exists()
    state, meta = lora.read_lora(out / "lora.safetensors")
    assert meta["backbone"] == kind and meta["rank"] == 8  # TSCD's 4 + the merged feedback's 4
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it learned
    for k in (1, 2):  # sample images for some of the cache's captions, with those captions beside them
        assert (out / f"samples-{k}step.png").stat().st_size > 0
        captions = (out / f"samples-{k}step.txt").read_text().splitlines()
        assert len(captions) == 6 and all(c.startswith("a photo of thing") for c in captions)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["data"] == {"items": 6, "skipped": {}}


def test_training_steps_take_the_prompts_conditioning_from_the_cache(setup, tmp_path, monkeypatch):
    from hypersd.train import stages

    teacher = load_teacher("sdxl", setup["sdxl"][0])
    d = Distiller(from_dict(_recipe("sdxl", setup)), tmp_path, progress=False, teacher=teacher)
    seen, loss = [], stages.TSCDRun.loss
    monkeypatch.setattr(stages.TSCDRun, "loss", lambda self, z, p, cond: (seen.append(cond), loss(self, z, p, cond))[1])

    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder ran during a training step")

    monkeypatch.setattr(teacher, "encode_prompt", no_encoder)
    assert d.run()
    assert len(seen) == 2 and all(c.added["time_ids"].shape == (2, 6) for c in seen)
    # the rows' own sizes and crops, not the pipeline's default (16, 16, 0, 0, 16, 16)
    assert any(c.added["time_ids"][:, :4].ne(torch.tensor([16.0, 16, 0, 0])).any() for c in seen)


def test_a_cfg_preserving_sdxl_run_trains_and_records_its_guidance(setup, tmp_path):
    """cfg: preserve on SDXL: dropped rows take the pipeline's empty prompt (zeros) with their own size ids."""
    recipe = from_dict(_recipe("sdxl", setup, cfg="preserve", cfg_guidance=5.0, cfg_dropout=0.5))
    d = Distiller(recipe, tmp_path, progress=False)
    assert d.run()
    state, meta = lora.read_lora(d.finish())
    assert (meta["cfg"], meta["guidance"]) == ("preserve", 5.0)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it learned


def test_sd_recipes_refuse_wrong_or_missing_data(setup, tmp_path):
    with pytest.raises(HypersdError, match="needs its data pipeline: set data:"):
        Distiller(from_dict({**_recipe("sd15", setup), "data": None}), tmp_path)
    with pytest.raises(HypersdError, match="made at resolution 16, the recipe trains at 512"):
        Distiller(from_dict({**_recipe("sd15", setup), "resolution": 512}), tmp_path)
    with pytest.raises(HypersdError, match="made for backbone sdxl, not sd15"):
        Distiller(from_dict({**_recipe("sd15", setup), "data": str(setup["sdxl"][1])}), tmp_path)
    with pytest.raises(HypersdError, match="data, resolution and vae are for the sd15 and sdxl backbones"):
        Distiller(from_dict({"data": str(setup["sd15"][1]), "stages": [{"name": "x"}]}), tmp_path)


def test_recipe_vae_replaces_the_models_own(setup, tmp_path):
    torch.manual_seed(5)
    _vae().save_pretrained(tmp_path / "vae")
    d = Distiller(from_dict(_recipe("sd15", setup, vae=str(tmp_path / "vae"))), tmp_path / "run", progress=False)
    first = next(d.teacher.vae.parameters())
    assert torch.equal(first, next(type(d.teacher.vae).from_pretrained(tmp_path / "vae").parameters()))
    wide = type(d.teacher.vae)(latent_channels=8, block_out_channels=(32, 64),
                               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(HypersdError, match="makes 8-channel latents .* needs 4 channels"):
        Distiller(from_dict(_recipe("sd15", setup, vae=str(tmp_path / "wide"))), tmp_path / "run2", progress=False)


def test_packaged_sd_recipes_use_the_papers_resolution_and_stages():
    for name, resolution in (("sd15", 512), ("sdxl", 1024)):
        r = load_recipe(name)
        assert r.backbone == name and r.resolution == resolution and r.data is None
        assert [s.kind for s in r.stages] == ["tscd"] * 4 + ["feedback", "merge", "dmd"]
        assert [s.segments for s in r.stages if s.kind == "tscd"] == [8, 4, 2, 1]


DMD_AFTER_TSCD = [{"name": "t2", "segments": 2, "adv_weight": 0.5, "steps": 2},
                  {"name": "d", "kind": "dmd", "steps": 2, "fake_warmup": 1, "fake_updates": 1, "reg_pool": 2,
                   "reg_steps": 2, "reg_batch": 1}]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_run_killed_and_resumed_equals_the_uninterrupted_one(precision, setup, tmp_path):
    """fp16: every optimizer (student, discriminator, fake score) has a scaler to resume. bf16 (slow
    on a CPU): one TSCD stage, killed inside it."""
    from hypersd.train.checkpoint import list_checkpoints

    stages = DMD_AFTER_TSCD if precision == "fp16" else [{**DMD_AFTER_TSCD[0], "steps": 3}]
    make = lambda: from_dict(_recipe("sd15", setup, device="cpu", mixed_precision=precision,  # noqa: E731
                                     checkpoint_every=1, stages=stages))
    full = Distiller(make(), tmp_path / "full", progress=False)
    assert full.run()
    scalers = full.rt.scaler_states()
    if precision == "fp16":  # one per optimizer, and their scales moved: a resume that lost them would differ
        assert set(scalers) == {"student", "discriminator", "fake"}
        assert any(s["scale"] != 65536.0 for s in scalers.values())
    else:
        assert scalers == {}
    part = Distiller(make(), tmp_path / "part", progress=False)
    kill_at = 3 if precision == "fp16" else 2  # inside the last stage, right after a checkpoint
    assert not part.run(max_steps=kill_at)
    last = list_checkpoints(tmp_path / "part" / "checkpoints")[-1]
    assert last.name == f"step-{kill_at:07d}"
    assert torch.load(last / "optim.pt", weights_only=True)["scalers"] == part.rt.scaler_states()
    again = Distiller(make(), tmp_path / "part", progress=False)
    assert again.run(resume=True)
    assert again.rt.scaler_states() == scalers
    unet, want = again.teacher.unet, full.teacher.unet
    assert set(unet.peft_config) == set(want.peft_config)
    for name in unet.peft_config:
        a, b = lora.get_state(want, name), lora.get_state(unet, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
