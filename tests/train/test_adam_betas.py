import pytest
import torch

from hypersd.errors import HypersdError
from hypersd.nets import speed
from hypersd.train.recipe import from_dict
from hypersd.train.trainer import Distiller


def test_betas_are_checked_and_unset_keeps_the_fingerprint():
    plain = from_dict({"stages": [{"name": "t"}, {"name": "d", "kind": "dmd"}]}).fingerprint()
    unset = {"stages": [{"name": "t", "betas": None}, {"name": "d", "kind": "dmd", "betas": None, "fake_betas": None}]}
    assert from_dict(unset).fingerprint() == plain
    for stage in ({"name": "d", "kind": "dmd", "betas": [0.0, 0.999]}, {"name": "d", "kind": "dmd", "fake_betas": [0.0, 0.999]}):
        assert from_dict({"stages": [{"name": "t"}, stage]}).fingerprint() != plain
    for bad in ([0.9], [0.9, 1.0], [-0.1, 0.999]):
        with pytest.raises(HypersdError, match=r"betas must be \[beta1, beta2\]"):
            from_dict({"stages": [{"name": "d", "kind": "dmd", "betas": bad}]})
    with pytest.raises(HypersdError, match="fake_betas must be"):
        from_dict({"stages": [{"name": "d", "kind": "dmd", "fake_betas": [0.0]}]})
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert speed.optimizer(p, 1e-3).param_groups[0]["betas"] == (0.9, 0.999)
    assert speed.optimizer(p, 1e-3, betas=[0, 0.99]).param_groups[0]["betas"] == (0.0, 0.99)


def test_the_generator_and_the_fake_score_step_with_their_own_betas(tmp_path, random_teacher_file, monkeypatch):
    made = []
    real = speed.optimizer

    def recording(params, lr, *args, **kwargs):
        opt = real(params, lr, *args, **kwargs)
        made.append((lr, opt.param_groups[0]["betas"]))
        return opt

    monkeypatch.setattr(speed, "optimizer", recording)
    dmd = {"name": "d", "kind": "dmd", "steps": 1, "lr": 1e-4, "fake_lr": 2e-3, "fake_warmup": 1, "fake_updates": 1,
           "reg_pool": 2, "reg_steps": 2, "reg_batch": 2}
    recipe = from_dict({"teacher": str(random_teacher_file), "lora_rank": 4, "grid_every_stage": False,
                        "stage_defaults": {"batch": 2}, "stages": [
                            {"name": "t", "segments": 1, "steps": 1, "lr": 1e-3},
                            dict(dmd, betas=[0.0, 0.99], fake_betas=[0.5, 0.9])]})
    assert Distiller(recipe, tmp_path / "set", progress=False).run()
    assert (1e-3, (0.9, 0.999)) in made  # the TSCD stage left at AdamW's own
    assert (1e-4, (0.0, 0.99)) in made and (2e-3, (0.5, 0.9)) in made
