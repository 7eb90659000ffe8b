"""Data-parallel distillation under ``accelerate launch``: two CPU processes on a tiny SD1.5."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from sd_tiny import save_tiny
from test_imagedata import write_folder

from hypersd import lora
from hypersd.data.cache import build_cache
from hypersd.teachers import load_teacher
from hypersd.train.checkpoint import list_checkpoints
from hypersd.train.runtime import Runtime


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_folder(root / "images", n_good=6)
    model = str(save_tiny("sd15", root / "sd15"))
    build_cache("sd15", model, str(root / "images"), root / "cache", teacher=load_teacher("sd15", model),
                progress=False)
    recipe = {"backbone": "sd15", "teacher": model, "data": str(root / "cache"), "resolution": 16, "lora_rank": 4,
              "device": "cpu", "grid_every_stage": False, "eval_steps": [1], "checkpoint_every": 2,
              "checkpoint_keep": 10, "stage_defaults": {"batch": 2, "steps": 3},
              # the adversarial heads and the fake score have optimizers of their own: all must stay in step
              "stages": [{"name": "t2", "segments": 2, "adv_weight": 0.5},
                         {"name": "d", "kind": "dmd", "fake_warmup": 1, "fake_updates": 1, "reg_pool": 2,
                          "reg_steps": 2, "reg_batch": 1}]}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(recipe, out, *extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hypersd", "distill", "--config", str(recipe),
           "--out", str(out), "--quiet", "--no-eval", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + "\n---\n" + done.stderr[-3000:]
    return done


def test_two_processes_train_one_lora_and_resume_exactly(recipe_file, tmp_path):
    out = tmp_path / "run"
    _launch(recipe_file, out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["processes"] == 2  # the end-of-run check found both processes' weights identical
    whole, _ = lora.read_lora(out / "lora.safetensors")
    assert any(v.abs().sum() > 0 for k, v in whole.items() if "lora_B" in k)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # one process writes the log: one run start, one line per step (two stages of 3)
    assert [r["kind"] for r in log].count("run_start") == 1
    assert [r["global_step"] for r in log if r["kind"] == "step"] == list(range(1, 7))

    # each process keeps its own data stream in the checkpoints
    ckpts = list_checkpoints(out / "checkpoints")
    mid = [c for c in ckpts if json.loads((c / "state.json").read_text())["step"] > 0]
    assert mid, [c.name for c in ckpts]
    from safetensors.torch import load_file

    rng = load_file(str(mid[0] / "rng.safetensors"))
    assert not torch.equal(rng["process-0"], rng["process-1"])

    # killed after the first mid-stage checkpoint: resumed under two processes, the same LoRA
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid[0], resumed / "checkpoints" / mid[0].name)
    _launch(recipe_file, resumed, "--resume")
    again, _ = lora.read_lora(resumed / "lora.safetensors")
    assert all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.fixture
def joined(tmp_path):
    """This process as the one member of a gloo group, as accelerate launch would make it join."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    if torch.distributed.is_initialized():  # the command under test left it joined
        torch.distributed.destroy_process_group()


def test_a_finished_run_leaves_the_process_group(recipe_file, tmp_path, joined):
    from hypersd.cli import main

    # a process that exits with its gloo group alive can abort at interpreter exit (SIGABRT)
    argv = ["distill", "--config", str(recipe_file), "--out", str(tmp_path / "run"), "--quiet", "--no-eval",
            "--set", "stages=[{name: t2, steps: 1}]"]
    assert main(argv) == 0 and (tmp_path / "run" / "lora.safetensors").is_file()
    assert not torch.distributed.is_initialized()


def test_a_failed_run_leaves_the_process_group(recipe_file, tmp_path, joined, capsys):
    from hypersd.cli import main

    argv = ["distill", "--config", str(recipe_file), "--out", str(tmp_path / "run"), "--set", "data=nowhere"]
    assert main(argv) == 2 and "nowhere" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_one_process_runtime_is_a_no_op():
    rt = Runtime()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    rt.average([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert rt.gather("x") == ["x"] and rt.same_everywhere([p]) and rt.is_main
    assert rt.finite(torch.tensor(1.0)) and not rt.finite(torch.tensor(float("nan")))


# One process of two, with a bad loss or gradient on process 1 only: both must refuse the step.
GUARD_WORKER = """
import sys, torch
from hypersd.train.runtime import Runtime
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.distributed.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
rt = Runtime(rank=rank, world=2)
p = torch.nn.Parameter(torch.ones(2))
opt = torch.optim.SGD([p], lr=0.1)
applied = []
for case in ("nan loss", "inf gradient", "fine"):
    opt.zero_grad(set_to_none=True)
    loss = p.square().sum()
    if rank == 1 and case == "nan loss":
        loss = loss * float("nan")
    if rank == 1 and case == "inf gradient":  # a finite loss (0) whose gradient is inf
        loss = (p - 1).sqrt().sum()
    applied.append(rt.step(loss, opt, [p], role="fake") is not None)
torch.save({"applied": applied, "p": p.detach(), "skipped": rt.guard.counts}, out)
torch.distributed.destroy_process_group()
"""


def test_a_step_bad_on_one_process_is_refused_on_every_process(tmp_path):
    import hypersd

    src = os.path.dirname(os.path.dirname(hypersd.__file__))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", GUARD_WORKER, str(r), str(tmp_path / "init"),
                               str(tmp_path / f"{r}.pt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    for res in results:
        assert res["applied"] == [False, False, True] and res["skipped"] == {"fake": 2}
        assert torch.equal(res["p"], torch.full((2,), 0.8))  # only the last step moved it: 1 - 0.1·2
