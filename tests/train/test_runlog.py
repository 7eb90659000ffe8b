"""The run log: OUT/log.jsonl line by line while a distill runs, trackers, main process only."""

import json
import math

import pytest
import torch
from test_trainer import tiny_recipe

from hypersd.cli import main
from hypersd.errors import HypersdError
from hypersd.train import runlog
from hypersd.train.runtime import Runtime
from hypersd.train.trainer import Distiller


def records(folder, kind=None):
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def test_every_step_is_logged_as_it_happens_and_a_resume_appends(tmp_path, random_teacher_file, capsys):
    run = tmp_path / "run"
    d = Distiller(tiny_recipe(random_teacher_file), run, progress=False)
    seen = []  # step lines already on disk when each batch is drawn: the file is readable mid-run
    draw = d.batch
    d.batch = lambda n, g=None: seen.append(len(records(run, "step")) if (run / "log.jsonl").exists() else 0) \
        or draw(n, g)
    assert not d.run(max_steps=5)  # "killed" in stage b, after the checkpoint at global step 4
    assert seen == [0, 1, 2, 3, 4]

    steps = records(run, "step")
    assert [(r["stage"], r["step"], r["global_step"]) for r in steps] == \
        [("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("a", 4, 4), ("b", 1, 5)]
    for r in steps:
        assert not r["skipped"] and r["skipped_so_far"] == {}
        assert r["losses"]["mse"] is not None and math.isfinite(r["losses"]["mse"])
        assert r["lr"] == d.recipe.stages[0].lr and r["grad_norm"] > 0 and r["seconds"] > 0
    assert set(steps[-1]["losses"]) == {"mse", "g", "d"}  # stage b: the adversarial losses too
    kinds = [r["kind"] for r in records(run)]
    assert kinds[:2] == ["run_start", "stage_start"] and "stage_end" in kinds
    assert [r["global_step"] for r in records(run, "checkpoint")] == [3, 4]

    with open(run / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "glo')  # killed in mid-line: the resumed run's first record starts a new line
    again = Distiller(tiny_recipe(random_teacher_file), run, progress=False)
    assert again.run(resume=True)
    again.finish()
    start = records(run, "run_start")
    assert [(r["resume"], r["global_step"]) for r in start] == [(False, 0), (True, 4)]
    assert [r["global_step"] for r in records(run, "step")] == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # 5 repeated
    assert [r["global_step"] for r in runlog.steps(records(run))] == list(range(1, 9))
    assert records(run, "samples")[0]["path"].endswith("samples-1step.png")
    assert records(run)[-1]["kind"] == "run_end"

    with open(run / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "glo')  # a line cut short (the last) is left out, not an error
    capsys.readouterr()
    assert main(["log", "summary", str(run)]) == 0
    table = capsys.readouterr().out
    assert "| a | 4 | 0 | mse " in table and "| b | 4 | 0 | mse " in table and "1 resume(s)" in table


def test_skipped_steps_are_logged_with_their_count(tmp_path, random_teacher_file):
    d = Distiller(tiny_recipe(random_teacher_file, stages=[{"name": "a", "segments": 2}]), tmp_path, progress=False)
    d.data.batch = lambda n, g: (torch.full((n, 1, 8, 8), float("nan")), ["a handwritten digit one"] * n)
    d.run(max_steps=2)
    steps = records(tmp_path, "step")
    assert [(r["skipped"], r["skipped_so_far"]["student"], r["losses"], r["lr"]) for r in steps] == \
        [(True, 1, {}, None), (True, 2, {}, None)]


def test_tensorboard_gets_the_step_scalars(tmp_path, random_teacher_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(random_teacher_file, stages=[{"name": "a", "segments": 2}])
    d = Distiller(recipe, tmp_path / "run", progress=False, log_with=["tensorboard"])
    d.run(max_steps=3)
    d.log.close()
    (events,) = (tmp_path / "run" / "tensorboard").iterdir()
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"loss/mse", "lr", "grad_norm", "step_seconds"} <= set(acc.Tags()["scalars"])
    logged = [(r["global_step"], r["grad_norm"]) for r in records(tmp_path / "run", "step")]
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm")] == [(g, pytest.approx(v)) for g, v in logged]


def test_a_missing_tracker_package_is_refused_before_training(tmp_path, random_teacher_file, monkeypatch, capsys):
    monkeypatch.setattr(runlog, "_available", lambda name: False)
    with pytest.raises(HypersdError, match=r"pip install 'hypersd\[tensorboard\]'"):
        Distiller(tiny_recipe(random_teacher_file), tmp_path / "run", progress=False, log_with=["tensorboard"])
    assert not (tmp_path / "run").exists()
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"teacher: {random_teacher_file}\nstages:\n  - {{name: s, steps: 1, batch: 2}}\n")
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "cli"), "--log-with", "wandb"]) == 2
    assert "pip install 'hypersd[wandb]'" in capsys.readouterr().err
    with pytest.raises(HypersdError, match="unknown tracker 'mlflow'"):
        runlog.check_trackers(["mlflow"])


def test_only_the_main_process_writes(tmp_path, random_teacher_file, monkeypatch):
    log = runlog.RunLog(tmp_path / "run", is_main=False)
    log.write("run_start", resume=False)
    log.step("a", 1, 1, {"mse": torch.tensor(0.5), "lr": 1e-3, "grad_norm": torch.tensor(1.0)}, 0.1, {})
    log.close()
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(Runtime, "create", classmethod(lambda cls, *a: cls(rank=1, world=2)))
    d = Distiller(tiny_recipe(random_teacher_file), tmp_path / "rank1", progress=True)
    assert not d.progress and not d.log.is_main  # no second progress bar, no second log


def test_runtime_step_returns_the_norm_before_clipping():
    rt = Runtime()
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    norm = rt.step((p * torch.tensor([3.0, 4.0])).sum(), opt, [p], clip=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]))  # the update was clipped to norm 1
