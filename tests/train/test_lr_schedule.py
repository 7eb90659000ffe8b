import math

import pytest

from hypersd.errors import HypersdError
from hypersd.train import runlog
from hypersd.train.lr_schedule import stage_lr
from hypersd.train.recipe import TSCDStage, from_dict
from hypersd.train.trainer import Distiller


def test_cosine_runs_from_lr_to_lr_end_and_constant_without_it():
    s = TSCDStage(name="t", steps=11, lr=1e-3, lr_end=1e-4)
    rates = [stage_lr(s, i) for i in range(11)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert rates[5] == pytest.approx(5.5e-4)  # the cosine's midpoint
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert stage_lr(s, 99) == pytest.approx(1e-4)  # past the end: held at lr_end
    assert {stage_lr(TSCDStage(name="t", steps=11, lr=1e-3), i) for i in range(11)} == {1e-3}


def test_lr_end_is_checked_and_unset_keeps_the_fingerprint():
    plain = from_dict({"stages": [{"name": "t"}]}).fingerprint()
    assert from_dict({"stages": [{"name": "t", "lr_end": None}]}).fingerprint() == plain
    assert from_dict({"stages": [{"name": "t", "lr_end": 1e-5}]}).fingerprint() != plain
    with pytest.raises(HypersdError, match="lr_end must be a learning rate >= 0"):
        from_dict({"stages": [{"name": "t", "lr_end": -1e-5}]})


def test_the_trainer_sets_each_steps_rate_and_a_resume_repeats_it(tmp_path, random_teacher_file):
    def recipe():
        return from_dict({"teacher": str(random_teacher_file), "lora_rank": 4, "grid_every_stage": False,
                          "checkpoint_every": 3, "stages": [
                              {"name": "t", "segments": 1, "steps": 6, "batch": 2, "lr": 1e-3, "lr_end": 0.0}]})

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert Distiller(recipe(), whole, progress=False).run()
    logged = [r["lr"] for r in runlog.steps(runlog.read(whole))]
    assert logged == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * i / 5)) for i in range(6)])
    assert not Distiller(recipe(), cut, progress=False).run(max_steps=4)  # stopped after step 4
    assert Distiller(recipe(), cut, progress=False).run(resume=True)
    assert [r["lr"] for r in runlog.steps(runlog.read(cut))] == pytest.approx(logged)
