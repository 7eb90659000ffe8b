"""``shard_base``: the frozen base sharded over two CPU processes (gloo) with FSDP2, under
``accelerate launch``: a TSCD stage trains the LoRA the unsharded data parallel trains, and what a
sharded base cannot run is refused before any model loads."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from flow_tiny import LATENT_SIZE, T5_LENGTH, save_flow_tiny
from safetensors.torch import load_file
from test_imagedata import write_folder

from hypersd import lora
from hypersd.data.cache import build_cache
from hypersd.errors import HypersdError
from hypersd.nets.shard import check_shardable
from hypersd.teachers import load_teacher
from hypersd.train.checkpoint import list_checkpoints
from hypersd.train.recipe import from_dict

SIDE = 2 * LATENT_SIZE


def _recipe(**kw):
    return from_dict({"backbone": "flux", "teacher": "x", "data": "x", "resolution": SIDE,
                      "stages": [{"name": "t", "segments": 2}], **kw}, "test")


def test_what_a_sharded_base_cannot_run_is_refused_naming_the_fix():
    with pytest.raises(HypersdError, match="one process.*--multi_gpu"):
        check_shardable(_recipe(shard_base=True), 1)
    with pytest.raises(HypersdError, match="compile.*shard_base: false"):
        check_shardable(_recipe(shard_base=True, compile=True), 2)
    feedback = _recipe(shard_base=True, stages=[{"name": "t", "segments": 2}, {"name": "d", "kind": "dmd"}])
    with pytest.raises(HypersdError, match="stage 'd': a dmd stage does not run on a sharded base.*tscd"):
        check_shardable(feedback, 2)
    check_shardable(_recipe(shard_base=True), 2)  # TSCD on two processes: fine


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    write_folder(root / "images", n_good=4)
    model = str(save_flow_tiny("flux", root / "flux"))
    teacher = load_teacher("flux", model, max_sequence_length=T5_LENGTH, resolution=SIDE)
    build_cache("flux", model, str(root / "images"), root / "cache", resolution=SIDE, max_sequence_length=T5_LENGTH,
                teacher=teacher, progress=False)
    # the grids at the stage's end and the run's: every process must sample them on a sharded base;
    # gradient checkpointing as the sd3 and flux recipes have it (each block all-gathers again in the backward)
    recipe = {"backbone": "flux", "teacher": model, "data": str(root / "cache"), "resolution": SIDE, "lora_rank": 4,
              "device": "cpu", "gradient_checkpointing": True, "grid_every_stage": True, "eval_steps": [1], "checkpoint_every": 100,
              "stages": [{"name": "t2", "segments": 2, "batch": 2, "steps": 3, "adv_weight": 0.5}]}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(recipe, out, shard: bool):
    cfg = yaml.safe_load(recipe.read_text()) | {"shard_base": shard}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hypersd", "distill",
           "--config", str(path), "--out", str(out), "--quiet", "--no-eval"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + "\n---\n" + done.stderr[-3000:]


@pytest.mark.slow
def test_a_sharded_base_trains_the_lora_the_unsharded_one_does(recipe_file, tmp_path):
    _launch(recipe_file, tmp_path / "plain", shard=False)
    _launch(recipe_file, tmp_path / "sharded", shard=True)
    plain, _ = lora.read_lora(tmp_path / "plain" / "lora.safetensors")
    sharded, _ = lora.read_lora(tmp_path / "sharded" / "lora.safetensors")
    assert set(plain) == set(sharded) and any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)
    stats = json.loads((tmp_path / "sharded" / "stats.json").read_text())
    # FLUX's blocks and the rest of it: each process holds about half of the frozen weights
    assert stats["shard_base"]["blocks"] > 0 and stats["shard_base"]["held"] < 0.55
    assert "shard_base" not in json.loads((tmp_path / "plain" / "stats.json").read_text())
    assert max((plain[k] - sharded[k]).abs().max().item() for k in plain) < 1e-5
    assert all((tmp_path / "sharded" / p).stat().st_size > 0 for p in ("samples-1step.png", "stages/t2/samples-2step.png"))
    # the checkpoint's LoRA is the whole adapter too, not a process's shard
    last = list_checkpoints(tmp_path / "sharded" / "checkpoints")[-1]
    saved = load_file(str(last / "lora-student.safetensors"))
    assert set(saved) == set(sharded) and all(torch.equal(saved[k], sharded[k]) for k in saved)
