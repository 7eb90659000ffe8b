"""Faults: a damaged newest checkpoint, a full disk mid-checkpoint, torn writes, and (slow) SIGKILLs."""

import errno
import os

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import tiny_recipe

from hypersd import outputs
from hypersd.errors import HypersdError
from hypersd.outputs import fsync_file as real_fsync_file
from hypersd.outputs import write_text
from hypersd.train import checkpoint
from hypersd.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from hypersd.train.trainer import Distiller


@pytest.fixture(scope="module")
def want(tmp_path_factory, random_teacher_file):
    """The uninterrupted run's LoRA."""
    d = Distiller(tiny_recipe(random_teacher_file), tmp_path_factory.mktemp("full"), progress=False)
    assert d.run()
    return load_file(str(d.finish()))


def _same(want, got):
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_truncated_newest_checkpoint_falls_back_to_the_one_before_saying_so(tmp_path, random_teacher_file,
                                                                            want, capfd):
    out = tmp_path / "part"
    assert not Distiller(tiny_recipe(random_teacher_file), out, progress=False).run(max_steps=7)
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000004", "step-0000006"]
    weights = ckpts[-1] / "lora-student.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut off
    capfd.readouterr()
    again = Distiller(tiny_recipe(random_teacher_file), out, progress=False)
    assert again.run(resume=True)  # goes on, from step 4, and writes step 6 anew
    err = capfd.readouterr().err
    assert "step-0000006 cannot be read" in err and "resuming from" in err and "step-0000004" in err
    assert (out / "checkpoints" / "damaged-step-0000006" / "lora-student.safetensors").is_file()  # kept to look at
    _same(want, load_file(str(again.finish())))
    assert "step-0000006" in again.stats["damaged_checkpoints"][0]


def test_no_readable_checkpoint_stops_with_what_to_do(tmp_path, random_teacher_file):
    out = tmp_path / "run"
    Distiller(tiny_recipe(random_teacher_file), out, progress=False).run(max_steps=3)
    (list_checkpoints(out / "checkpoints")[-1] / "state.json").write_text('{"fingerp')
    with pytest.raises(HypersdError, match="no checkpoint in .* can be read.*--force"):
        Distiller(tiny_recipe(random_teacher_file), out, progress=False).run(resume=True)


def test_fallback_still_refuses_another_recipes_checkpoint(tmp_path, random_teacher_file):
    out = tmp_path / "run"
    Distiller(tiny_recipe(random_teacher_file), out, progress=False).run(max_steps=7)
    (list_checkpoints(out / "checkpoints")[-1] / "optim.pt").write_bytes(b"")
    with pytest.raises(HypersdError, match="step-0000004 belongs to another recipe"):
        Distiller(tiny_recipe(random_teacher_file, seed=7), out, progress=False).run(resume=True)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_at_sync(path):
    """A file system that reports the full disk only when the data is flushed (delayed allocation)."""
    if ".tmp-step-" in str(path):
        _disk_full()
    real_fsync_file(path)


class SafetensorError(Exception):
    """safetensors' own type: the OS error only in its message."""


def _disk_full_safetensors(*args, **kwargs):
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                          "message: \"No space left on device\" })")


@pytest.mark.parametrize("where", ["save_file", "torch.save", "fsync"])
def test_full_disk_while_a_checkpoint_is_written_leaves_the_previous_one(where, tmp_path, random_teacher_file,
                                                                          want, monkeypatch):
    out = tmp_path / "part"
    assert not Distiller(tiny_recipe(random_teacher_file), out, progress=False).run(max_steps=3)
    target = {"save_file": (checkpoint, "save_file", _disk_full_safetensors),
              "torch.save": (checkpoint.torch, "save", _disk_full),
              "fsync": (outputs, "fsync_file", _full_at_sync)}[where]
    with monkeypatch.context() as m:
        m.setattr(*target)
        with pytest.raises(HypersdError) as e:
            Distiller(tiny_recipe(random_teacher_file), out, progress=False).run(resume=True)
    msg = str(e.value)
    assert "step-0000004 could not be written (no space left on the device)" in msg
    assert "step-0000003 is intact" in msg and "--resume" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]  # no half-written folder
    load_checkpoint(out / "checkpoints" / "step-0000003")
    if where != "torch.save":  # one resume shows the run goes on from there as if nothing happened
        return
    again = Distiller(tiny_recipe(random_teacher_file), out, progress=False)
    assert again.run(resume=True)
    _same(want, load_file(str(again.finish())))


def _ckpt(root, step):
    return save_checkpoint(root, step, {"rng": {"x": torch.ones(2) * step}, "lora-student": {"w": torch.zeros(1)}},
                           {"opt": None}, {"adapters": {"student": {}}, "step": step}, keep=2)


def test_what_a_killed_save_leaves_is_cleared_or_put_back(tmp_path):
    root = tmp_path / "ckpt"
    _ckpt(root, 1)
    _ckpt(root, 2)
    # killed mid-write: a half folder; killed while replacing step 2: the old one moved aside
    (root / ".tmp-step-0000003-999").mkdir()
    (root / "step-0000002").rename(root / ".old-step-0000002-998")
    path, (tensors, _, state) = checkpoint.load_latest(root, warn=pytest.fail)
    assert path.name == "step-0000002" and state["step"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"]


def test_a_checkpoint_missing_its_weights_counts_as_damaged(tmp_path):
    root = tmp_path / "ckpt"
    _ckpt(root, 1)
    (_ckpt(root, 2) / "lora-student.safetensors").unlink()
    said = []
    path, _ = checkpoint.load_latest(root, warn=said.append)
    assert path.name == "step-0000001"
    assert "no lora-student.safetensors" in said[0] and "damaged-step-0000002" in said[0]


def test_atomic_write_syncs_before_renaming_and_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "stats.json"
    write_text(path, "old")
    synced = []
    real = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: synced.append(path.read_text()) or real(fd))
    write_text(path, "new")
    assert synced and synced[0] == "old"  # the new file was synced while the old one still stood
    monkeypatch.setattr(outputs.os, "fsync", _disk_full)
    with pytest.raises(HypersdError, match="no space left on the device while writing .*stats.json; the file "
                                           "there is unchanged"):
        write_text(path, "newer")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temporary file left


@pytest.mark.slow
def test_sigkills_at_random_moments_then_resume_give_the_same_lora(tmp_path):
    from test_speed import _bench

    result = _bench("faults").distill_kills(tmp_path, kills=3, seed=1)
    assert result["kills"] == 3 and result["identical"], result
