"""One state_dict protocol for every stateful piece: a checkpoint holds each registered piece, and a
resume restores each one or refuses a checkpoint that lacks one."""

import copy
import json

import pytest
import torch

from hypersd.errors import HypersdError
from hypersd.train.checkpoint import (
    StateRegistry,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    saved_pieces,
)
from hypersd.train.recipe import from_dict
from hypersd.train.trainer import Distiller


def _recipe(teacher_file, **kw):
    return from_dict({"teacher": str(teacher_file), "lora_rank": 4, "checkpoint_every": 2, "checkpoint_keep": 2,
                      "grid_every_stage": False, "eval_steps": [1], "stage_defaults": {"batch": 4, "steps": 4},
                      "stages": [{"name": "a", "segments": 2, "adv_weight": 0.1, "d_hidden": 8}], **kw})


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_registry_stores_tensor_pieces_as_files_and_refuses_a_missing_piece(tmp_path):
    reg = StateRegistry()
    heads = torch.nn.Linear(3, 2)
    reg.register("heads", heads)
    reg.register("count", Counter(7))
    with pytest.raises(ValueError, match="already taken"):
        reg.register("count", Counter())
    from hypersd.train.checkpoint import split_states

    tensors, optim = split_states(reg.state_dict())
    assert set(tensors) == {"heads"} and optim == {"count": {"n": 7}}
    path = save_checkpoint(tmp_path, 1, tensors | {"rng": {"torch": torch.get_rng_state()}}, optim, {"adapters": {}})
    assert (path / "heads.safetensors").is_file()
    back = StateRegistry()
    fresh, count = torch.nn.Linear(3, 2), Counter()
    back.register("heads", fresh)
    back.register("count", count)
    back.load_state_dict(saved_pieces(*load_checkpoint(path)[:2]))
    assert count.n == 7 and torch.equal(fresh.weight, heads.weight)
    back.register("fake_opt", Counter())
    with pytest.raises(HypersdError, match=r"the checkpoint holds no 'fake_opt', which this run needs"):
        back.load_state_dict(saved_pieces(*load_checkpoint(path)[:2]))
    assert count.n == 7  # nothing was loaded before the refusal


def test_a_resumed_run_restores_every_registered_piece(tmp_path, random_teacher_file, monkeypatch):
    saved = {}
    write = Distiller._write_checkpoint

    def spy(self, stage_idx, step, global_step, states):
        saved[global_step] = copy.deepcopy(states)  # an optimizer's state_dict holds its live tensors
        return write(self, stage_idx, step, global_step, states)

    monkeypatch.setattr(Distiller, "_write_checkpoint", spy)
    part = Distiller(_recipe(random_teacher_file), tmp_path, progress=False)
    assert not part.run(max_steps=3)  # the checkpoint at step 2 is mid-stage
    want = saved[2]
    assert set(want) == {"rng", "scalers", "opt", "heads", "d_opt"}  # the discriminator's pieces too
    assert want["d_opt"]["state"] and want["opt"]["state"]  # both optimizers had stepped

    restored = {}

    def at_stage_start(self, *args):
        restored.update(self.pieces.state_dict())
        return True, 0

    monkeypatch.setattr(Distiller, "_run_stage", at_stage_start)
    again = Distiller(_recipe(random_teacher_file), tmp_path, progress=False)
    again.run(resume=True)
    assert set(restored) == set(want)
    for name in want:
        assert _same(restored[name], want[name]), name


def test_a_checkpoint_missing_a_registered_piece_is_refused_by_name(tmp_path, random_teacher_file):
    part = Distiller(_recipe(random_teacher_file), tmp_path, progress=False)
    assert not part.run(max_steps=3)
    last = list_checkpoints(tmp_path / "checkpoints")[-1]
    (last / "heads.safetensors").unlink()  # a stage's piece: refused once the stage is built
    with pytest.raises(HypersdError, match=rf"checkpoint {last} holds no 'heads', which this run needs"):
        Distiller(_recipe(random_teacher_file), tmp_path, progress=False).run(resume=True)
    again = Distiller(_recipe(random_teacher_file), tmp_path, progress=False)
    again.pieces.register("count", Counter())  # a run-level piece: refused before any stage is built
    with pytest.raises(HypersdError, match=r"holds no 'count'"):
        again.run(resume=True)


def test_a_checkpoint_from_before_the_registry_resumes_without_scalers(tmp_path, random_teacher_file):
    full = Distiller(_recipe(random_teacher_file), tmp_path / "full", progress=False)
    assert full.run()
    part = Distiller(_recipe(random_teacher_file), tmp_path / "part", progress=False)
    assert not part.run(max_steps=3)
    last = list_checkpoints(tmp_path / "part" / "checkpoints")[-1]
    state = json.loads((last / "state.json").read_text())
    del state["format"]
    (last / "state.json").write_text(json.dumps(state))
    optim = torch.load(last / "optim.pt", weights_only=True)
    del optim["scalers"]  # float32 runs of older versions wrote none
    torch.save(optim, last / "optim.pt")
    again = Distiller(_recipe(random_teacher_file), tmp_path / "part", progress=False)
    assert again.run(resume=True)
    got, want = again.teacher.unet.state_dict(), full.teacher.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if "lora_" in k)
