"""Training from an aspect-ratio-bucketed cache on tiny SD1.5, SDXL, SD3 and FLUX.1-dev teachers:
each step's batch is one bucket's, non-square latents go through every network, and a killed run
resumes to the same LoRA."""

import pytest
import torch
from flow_tiny import T5_LENGTH, save_flow_tiny
from sd_tiny import save_tiny
from test_buckets import SQUARE, TALL, WIDE, write_shapes

from hypersd import lora
from hypersd.data.cache import build_cache
from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher
from hypersd.teachers.flux import image_ids, pack, unpack
from hypersd.train import stages
from hypersd.train.recipe import from_dict
from hypersd.train.trainer import Distiller

KINDS = ("sd15", "sdxl", "sd3", "flux")
SHAPES = {(hw[0] // 2, hw[1] // 2) for hw in (WIDE, SQUARE, TALL)}  # their latents (the tiny VAEs halve)


def _teacher(kind, model):
    if kind in ("sd15", "sdxl"):
        return load_teacher(kind, model)
    return load_teacher(kind, model, max_sequence_length=T5_LENGTH, **({"resolution": 16} if kind == "flux" else {}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket-train")
    images = write_shapes(root / "images")
    out = {}
    for kind in KINDS:
        model = str(save_tiny(kind, root / kind) if kind in ("sd15", "sdxl") else save_flow_tiny(kind, root / kind))
        build_cache(kind, model, str(images), root / f"cache-{kind}", resolution=16, shard_size=4, buckets=True,
                    bucket_step=4, teacher=_teacher(kind, model), progress=False,
                    **({"max_sequence_length": T5_LENGTH} if kind in ("sd3", "flux") else {}))
        out[kind] = (model, root / f"cache-{kind}")
    return out


def _recipe(kind, setup, **kw) -> dict:
    model, cache = setup[kind]
    # the adversarial term too: its discriminator reads the networks' features on non-square grids
    stage = {"name": "t2", "segments": 2, "adv_weight": 0.05, **({"solver_steps": 43} if kind == "sd3" else {})}
    return {"backbone": kind, "teacher": model, "data": str(cache), "resolution": 16, "lora_rank": 4,
            "grid_every_stage": False, "eval_steps": [1], "checkpoint_every": 100,
            "stage_defaults": {"batch": 2, "steps": 4}, "stages": [stage], **kw}


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_take_one_bucket_a_batch(kind, setup, tmp_path, monkeypatch):
    seen, loss = [], stages.TSCDRun.loss
    monkeypatch.setattr(stages.TSCDRun, "loss", lambda self, z, p, cond: (seen.append((z, cond)), loss(self, z, p, cond))[1])
    d = Distiller(from_dict(_recipe(kind, setup)), tmp_path, progress=False)
    assert d.stats["data"]["buckets"] == {"20x12": 3, "16x16": 1, "12x20": 2}
    assert d.run()
    assert len(seen) == 4 and all(tuple(z.shape[2:]) in SHAPES for z, _ in seen)
    assert any(z.shape[2] != z.shape[3] for z, _ in seen)  # non-square batches trained
    if kind == "sdxl":  # each row's target size is its batch's bucket, in pixels
        assert all(c.added["time_ids"][:, 4:].tolist() == [[z.shape[2] * 2, z.shape[3] * 2]] * 2 for z, c in seen)
    state = lora.get_state(d.teacher.unet, lora.STUDENT)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it learned


def test_a_killed_bucketed_run_resumes_to_the_same_lora(setup, tmp_path):
    make = lambda: from_dict(_recipe("sd15", setup, checkpoint_every=2, stage_defaults={"batch": 2, "steps": 3}))
    full = Distiller(make(), tmp_path / "full", progress=False)
    assert full.run()
    part = Distiller(make(), tmp_path / "part", progress=False)
    assert not part.run(max_steps=2)
    again = Distiller(make(), tmp_path / "part", progress=False)
    assert again.run(resume=True)
    a, b = lora.get_state(full.teacher.unet, lora.STUDENT), lora.get_state(again.teacher.unet, lora.STUDENT)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_flux_packs_and_places_non_square_latents(setup):
    x = torch.randn(2, 16, 6, 10)
    tokens = pack(x)
    assert tokens.shape == (2, 15, 64) and torch.equal(unpack(tokens, 6, 10), x)
    ids = image_ids(6, 10, "cpu", torch.float32)
    assert ids.shape == (15, 3) and ids[:, 1].max() == 2 and ids[:, 2].max() == 4  # 3 rows of 5 tokens
    t = _teacher("flux", setup["flux"][0])
    cond = t.encode_prompt(["a wide picture"] * 2)
    assert t.eps(x, torch.tensor([500, 500]), cond).shape == x.shape


def test_sd3_buckets_beyond_its_position_table_are_refused(setup, tmp_path):
    model, _ = setup["sd3"]
    t = _teacher("sd3", model)
    assert t.eps(torch.randn(1, 16, 6, 10), torch.tensor([500]), t.encode_prompt(["wide"])).shape == (1, 16, 6, 10)
    with pytest.raises(HypersdError, match="pos_embed_max_size"):  # at 32 px a 24x40 bucket: 20 latents, > 16
        build_cache("sd3", model, str(write_shapes(tmp_path / "images")), tmp_path / "c", resolution=32, buckets=True, bucket_step=4, teacher=t, progress=False,
                    max_sequence_length=T5_LENGTH)
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.fixture(scope="module")
def sdxl_dmd(setup, tmp_path_factory):
    """One TSCD -> DMD run on the bucketed SDXL cache: what DMD's generator made each step, what its
    fake score's updates (the warm-up's first) were given, and the regulariser's pool."""
    made, warm, pools = [], [], []
    after, update, make = stages.DMDRun.after_step, stages.DMDRun._fake_update, stages.DMDRun._make_pool
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stages.DMDRun, "after_step", lambda self: (made.append(self._last), after(self))[1])
        m.setattr(stages.DMDRun, "_fake_update", lambda self, x, c, real: (warm.append((x, c)), update(self, x, c, real))[1])
        m.setattr(stages.DMDRun, "_make_pool", lambda self: (make(self), pools.append(self.pool))[0])
        dmd = {"name": "d", "kind": "dmd", "steps": 3, "fake_warmup": 3, "fake_updates": 1, "reg_pool": 2,
               "reg_steps": 2, "reg_batch": 1}
        recipe = _recipe("sdxl", setup, stages=[{"name": "t", "segments": 2, "steps": 1}, dmd])
        assert Distiller(from_dict(recipe), tmp_path_factory.mktemp("sdxl-dmd"), progress=False).run()
    return made, warm, pools


def test_dmd_generates_at_the_batchs_bucket(sdxl_dmd):
    """SDXL's time ids name the bucket as the target size: the generator makes that size, not the square."""
    seen = sdxl_dmd[0]
    assert len(seen) == 3 and any(x.shape[2] != x.shape[3] for x, *_ in seen)
    for x, cond, _ in seen:
        assert cond.added["time_ids"][:, 4:].tolist() == [[x.shape[2] * 2, x.shape[3] * 2]] * len(x)


def test_dmd_warm_up_and_pool_are_made_at_their_draws_bucket(sdxl_dmd):
    """The fake score's warm-up samples and the regulariser's pool are drawn from the cache too: each
    is made at the size its SDXL time ids name (its draw's bucket), not at the square."""
    _, warm, pools = sdxl_dmd
    noise, cond, out = pools[0]
    assert out.shape == noise.shape and noise.shape[2] != noise.shape[3]  # this seed's pool: a non-square bucket
    assert cond.added["time_ids"][:, 4:].tolist() == [[noise.shape[2] * 2, noise.shape[3] * 2]] * len(noise)
    assert len(warm) >= 3
    for x, c in warm:
        assert c.added["time_ids"][:, 4:].tolist() == [[x.shape[2] * 2, x.shape[3] * 2]] * len(x)
