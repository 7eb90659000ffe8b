"""``shard_base``: the frozen base sharded over two CPU processes (gloo) with FSDP2, under
``accelerate launch``: TSCD, feedback, merge and DMD stages train the LoRA the unsharded data
parallel trains (every process draws the same step counts from a shared stream, its own noise from
its own), and what a sharded base cannot run is refused before any model loads."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from flow_tiny import LATENT_SIZE, T5_LENGTH, save_flow_tiny
from safetensors.torch import load_file
from test_buckets import write_shapes
from test_imagedata import write_folder
from test_train_sd import clip_reward  # noqa: F401  (a fixture)

from hypersd import lora
from hypersd.data.cache import build_cache
from hypersd.errors import HypersdError
from hypersd.losses.dmd import draw_generator_step, generate
from hypersd.losses.feedback import draw_stop
from hypersd.nets.shard import check_shardable
from hypersd.teachers import load_teacher
from hypersd.train import stages as stage_kinds
from hypersd.train.checkpoint import list_checkpoints
from hypersd.train.recipe import from_dict
from hypersd.train.runtime import SHARED_SEED, RandomStreams, Runtime, run_streams
from hypersd.train.trainer import Distiller

SIDE = 2 * LATENT_SIZE


def _recipe(**kw):
    return from_dict({"backbone": "flux", "teacher": "x", "data": "x", "resolution": SIDE,
                      "stages": [{"name": "t", "segments": 2}], **kw}, "test")


def test_what_a_sharded_base_cannot_run_is_refused_naming_the_fix():
    with pytest.raises(HypersdError, match="one process.*--multi_gpu"):
        check_shardable(_recipe(shard_base=True), 1)
    with pytest.raises(HypersdError, match="compile.*shard_base: false"):
        check_shardable(_recipe(shard_base=True, compile=True), 2)
    with pytest.raises(HypersdError, match="quantize_base.*shard_base: false"):
        check_shardable(_recipe(shard_base=True, quantize_base="int8"), 2)
    every_kind = [{"name": "t", "segments": 2, "solve_below": 249}, {"name": "fb", "kind": "feedback", "rewards": [{"name": "clip"}]},
                  {"name": "m", "kind": "merge"},
                  {"name": "d", "kind": "dmd", "generator_steps": [1, 2]}]
    check_shardable(_recipe(shard_base=True, stages=every_kind), 2)  # every stage kind on two processes: fine


def test_processes_draw_the_same_step_counts_and_their_own_noise():
    (own0, shared0), (own1, shared1) = run_streams(5, 0, 2), run_streams(5, 1, 2)
    # DMD's generator step, then feedback's stopping step, as the stages draw them
    draws = [[(draw_generator_step([1, 2, 4, 8], shared), draw_stop([1, 2, 4], [0, 999], 1000, shared))
              for _ in range(8)] for shared in (shared0, shared1)]
    assert draws[0] == draws[1] and len({k for (k, _), _ in draws[0]}) > 1
    assert not torch.equal(torch.randn(4, generator=own0), torch.randn(4, generator=own1))
    own, shared = run_streams(5, 0, 1)  # one process: its own stream draws them, as before there were two
    assert shared is None and torch.equal(own.get_state(), torch.Generator().manual_seed(5).get_state())


def test_the_shared_stream_is_checkpointed_and_seeded_by_step_where_a_checkpoint_has_none():
    own, shared = run_streams(3, 0, 2)
    streams = RandomStreams(own, Runtime(), 3, shared)
    torch.randn(5, generator=shared)
    state = streams.state_dict()
    want = torch.randn(3, generator=shared)
    torch.randn(7, generator=shared)
    streams.load_state_dict(state)
    assert torch.equal(torch.randn(3, generator=shared), want)
    streams.step = 4  # a checkpoint one process wrote holds none: every process seeds it alike
    streams.load_state_dict({k: v for k, v in state.items() if k != "shared"})
    assert torch.equal(shared.get_state(), torch.Generator().manual_seed(3 + SHARED_SEED + 4).get_state())
    assert "shared" not in RandomStreams(own, Runtime(), 3).state_dict()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, random_teacher_file):
    recipe = from_dict({"teacher": str(random_teacher_file), "lora_rank": 4, "grid_every_stage": False,
                        "stage_defaults": {"batch": 2, "steps": 2}, "stages": [
                            {"name": "t", "segments": 1},
                            {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits"}],
                             "sample_steps": [1, 2, 4]},
                            {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 2, "reg_steps": 1,
                             "reg_batch": 1, "keep_steps": [2], "generator_steps": [1, 2, 4], "generator_t": 800}]})
    return Distiller(recipe, tmp_path_factory.mktemp("digits"), progress=False)


def test_two_processes_stages_make_the_same_calls_on_their_own_noise(digits_run, monkeypatch):
    """Each process's feedback and DMD stages stop their samplers at the same steps (the number of
    network calls a step makes), drawn from the shared stream, while their noise is their own."""
    d, recipe = digits_run, digits_run.recipe
    calls = []

    def spy(eps_fn, noise, timesteps, stop, schedule, **kw):  # the sampler's calls themselves are not looked at
        calls.append((len(timesteps), stop, noise))
        return noise

    monkeypatch.setattr(stage_kinds, "sample_until", spy)
    monkeypatch.setattr(stage_kinds, "simulate", spy)
    seen = []
    for rank in (0, 1):
        own, shared = run_streams(recipe.seed, rank, 2)
        ctx = dataclasses.replace(d.stage_context(), generator=own, control=shared)
        calls.clear()
        for stage in recipe.stages[1:]:
            run = stage_kinds.stage_run(ctx, stage)
            run.enter(fresh=True)
            for _ in range(4):
                z, prompts, cond = ctx.batch(2, own)
                run.loss(z, prompts, cond)
        seen.append(list(calls))
    steps = [[(k, i) for k, i, _ in calls] for calls in seen]
    assert len(steps[0]) == 8 and steps[0] == steps[1] and len(set(steps[0])) > 2
    assert not any(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(*seen))


def test_dmd_makes_its_one_call_only_where_every_process_batch_has_the_pool_size(digits_run, monkeypatch):
    """A bucketed cache's batches differ in size from process to process: DMD generates its batch
    and the regulariser's in one call only where every process's batch has the pool's size."""
    d = digits_run
    run = stage_kinds.stage_run(d, d.recipe.stages[2])
    run.enter(fresh=True)
    calls = []

    def spy(eps_fn, x, t, schedule):
        calls.append((t, len(x)))
        return generate(eps_fn, x, t, schedule)

    monkeypatch.setattr(stage_kinds, "generate", spy)
    monkeypatch.setattr(stage_kinds, "draw_generator_step", lambda steps, generator: (1, 0))  # at generator_t
    for others_fit, want in ((True, [(800, 3)]), (False, [(800, 2), (800, 1)])):
        monkeypatch.setattr(d.rt, "everywhere", lambda ok, fit=others_fit: ok and fit)
        calls.clear()
        run.loss(*d.batch(2))
        assert calls == want


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


@pytest.fixture(scope="module")
def every_kind_file(recipe_file, clip_reward):  # noqa: F811
    """TSCD, feedback (its sampler stopping at a drawn step), a merge compressed back to rank 4 and
    multi-step DMD (its generator step drawn) with the keep term, on the same model and data."""
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe |= {"checkpoint_every": 3, "checkpoint_keep": 10, "stage_defaults": {"batch": 2, "steps": 2}, "stages": [
        {"name": "t2", "segments": 2},
        {"name": "fb", "kind": "feedback", "rewards": [{"name": "clip", "path": clip_reward, "weight": 0.1}],
         "sample_steps": [1, 2, 4], "t_range": [0, 1199]},
        {"name": "m", "kind": "merge", "ratio": 0.5, "rank": 4},
        {"name": "d", "kind": "dmd", "steps": 3, "generator_t": 1199, "t_range": [24, 1176], "generator_steps": [1, 2],
         "generator_eta": 0.5, "fake_warmup": 1, "fake_updates": 1, "reg_pool": 2, "reg_steps": 2, "reg_batch": 1,
         "keep_weight": 1.0, "keep_batch": 2, "keep_steps": [2]}]}
    path = recipe_file.parent / "every-kind.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# hypersd distill under a patch that sees what each process does: ``seen``, written to
# OUT/seen-RANK.json once the run ends
WORKER = """
import json, os, sys
rank, seen = int(os.environ["RANK"]), []
{patch}
from hypersd.cli import main
main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(out, f"seen-{{rank}}.json"), "w") as f:
    json.dump(seen, f)
"""


def _worker(tmp_path, patch: str) -> tuple[str]:
    path = tmp_path / "worker.py"
    path.write_text(WORKER.format(patch=patch))
    return (str(path),)


def _seen(out) -> list:
    return [json.loads((out / f"seen-{r}.json").read_text()) for r in (0, 1)]


def _launch(recipe, out, shard: bool, *extra, program=("-m", "hypersd")):
    cfg = yaml.safe_load(recipe.read_text()) | {"shard_base": shard}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *program, "distill",
           "--config", str(path), "--out", str(out), "--quiet", "--no-eval", *extra]
    # its own process group: processes that called the network differently would wait on each other for good
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the two processes did not finish in 400 s (hung?)\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-2000:] + "\n---\n" + stderr[-3000:]


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


def _lora(out):
    return lora.read_lora(out / "lora.safetensors")[0]


@pytest.mark.slow
def test_every_stage_kind_trains_on_a_sharded_base_the_lora_the_unsharded_one_does(every_kind_file, tmp_path):
    _launch(every_kind_file, tmp_path / "plain", shard=False)
    _launch(every_kind_file, tmp_path / "sharded", shard=True)
    plain, sharded = _lora(tmp_path / "plain"), _lora(tmp_path / "sharded")
    assert set(plain) == set(sharded) and any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)
    assert lora.read_lora(tmp_path / "sharded" / "lora.safetensors")[1]["rank"] == 4  # the merge's compression
    assert json.loads((tmp_path / "sharded" / "stats.json").read_text())["shard_base"]["held"] < 0.55
    assert max((plain[k] - sharded[k]).abs().max().item() for k in plain) < 1e-5
    for stage in ("fb", "m", "d"):  # each stage's LoRA, and its grid sampled on every process
        assert (tmp_path / "sharded" / "stages" / stage / "lora.safetensors").is_file()
        assert (tmp_path / "sharded" / "stages" / stage / "samples-1step.png").stat().st_size > 0

    # killed inside the feedback stage (global step 3 of 7): resumed sharded, the same LoRA exactly
    # (the shared stream, which feedback had drawn from and DMD draws from, comes back with the
    # checkpoint; seeded afresh instead, the LoRA ends 0.04 away)
    mid = [c for c in list_checkpoints(tmp_path / "sharded" / "checkpoints")
           if json.loads((c / "state.json").read_text())["global_step"] == 3]
    assert mid and "shared" in load_file(str(mid[0] / "rng.safetensors"))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid[0], resumed / "checkpoints" / mid[0].name)
    _launch(every_kind_file, resumed, True, "--resume")
    again = _lora(resumed)
    assert all(torch.equal(sharded[k], again[k]) for k in sharded)


# process 1's TSCD loss turned NaN at its second step, on that process only
NAN_ON_ONE = """
from hypersd.train import stages
loss, calls = stages.TSCDRun.loss, [0]

def loss_nan_once(self, *args, **kwargs):
    calls[0] += 1
    out = loss(self, *args, **kwargs)
    return (out[0] * float("nan"), *out[1:]) if rank == 1 and calls[0] == 2 else out

stages.TSCDRun.loss = loss_nan_once
"""


@pytest.mark.slow
def test_a_step_nan_on_one_process_is_skipped_on_both_sharded_as_unsharded(recipe_file, tmp_path):
    """A sharded base's processes call its all-gathers together: a step one process finds
    non-finite must be refused on both (before either runs a backward), counted once, and the run
    must go on in step, ending with the LoRA the unsharded data parallel makes from the same skip."""
    for name, shard in (("plain", False), ("sharded", True)):
        _launch(recipe_file, tmp_path / name, shard, program=_worker(tmp_path, NAN_ON_ONE))
        stats = json.loads((tmp_path / name / "stats.json").read_text())  # process 0's: its own losses were finite
        assert stats["nan_skipped"] == 1 and stats["stages"]["t2"]["skipped"] == {"student": 1}
        steps = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert [r["skipped"] for r in steps if r["kind"] == "step"] == [False, True, False]
    plain, sharded = _lora(tmp_path / "plain"), _lora(tmp_path / "sharded")
    assert all(torch.isfinite(v).all() for v in sharded.values())
    assert max((plain[k] - sharded[k]).abs().max().item() for k in plain) < 1e-5


# the latent shape of every TSCD batch a process trains on
SHAPES_SEEN = """
from hypersd.train import stages
loss = stages.TSCDRun.loss
stages.TSCDRun.loss = lambda self, z, *args, **kwargs: seen.append(list(z.shape[2:])) or loss(self, z, *args, **kwargs)
"""


@pytest.fixture(scope="module")
def bucketed_file(recipe_file):
    """TSCD, then DMD with its regulariser and keep term, on a FLUX cache in three aspect-ratio
    buckets: each process draws its own batches, so the two train on different shapes at a step."""
    root, recipe = recipe_file.parent, yaml.safe_load(recipe_file.read_text())
    write_shapes(root / "shapes")
    teacher = load_teacher("flux", recipe["teacher"], max_sequence_length=T5_LENGTH, resolution=16)
    build_cache("flux", recipe["teacher"], str(root / "shapes"), root / "cache-buckets", resolution=16, shard_size=4,
                buckets=True, bucket_step=4, max_sequence_length=T5_LENGTH, teacher=teacher, progress=False)
    recipe |= {"data": str(root / "cache-buckets"), "resolution": 16, "grid_every_stage": False, "stages": [
        {"name": "t2", "segments": 2, "batch": 2, "steps": 4},
        {"name": "d", "kind": "dmd", "steps": 3, "batch": 2, "generator_t": 1199, "t_range": [24, 1176],
         "fake_warmup": 1, "fake_updates": 1, "reg_pool": 2, "reg_steps": 2, "reg_batch": 1, "keep_weight": 1.0,
         "keep_batch": 2, "keep_steps": [2]}]}
    path = root / "bucketed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_a_bucketed_cache_trains_on_a_sharded_base_the_lora_the_unsharded_one_does(bucketed_file, tmp_path):
    for name, shard in (("plain", False), ("sharded", True)):
        _launch(bucketed_file, tmp_path / name, shard, program=_worker(tmp_path, SHAPES_SEEN))
    shapes = _seen(tmp_path / "sharded")
    assert len(shapes[0]) == len(shapes[1]) == 4 and shapes[0] != shapes[1]  # the processes' batches differ in shape
    assert shapes == _seen(tmp_path / "plain")
    plain, sharded = _lora(tmp_path / "plain"), _lora(tmp_path / "sharded")
    assert set(plain) == set(sharded) and any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)
    assert max((plain[k] - sharded[k]).abs().max().item() for k in plain) < 1e-5


# how many low-noise solve calls a process's rows needed at each step
SOLVE_CALLS = """
from hypersd.losses.tscd import ConsistencyStep
count = ConsistencyStep.solve_calls
ConsistencyStep.solve_calls = lambda self, *args: seen.append(count(self, *args)) or seen[-1]
"""


@pytest.mark.slow
def test_a_low_noise_solve_runs_on_a_sharded_base_in_lockstep(recipe_file, tmp_path):
    """solve_below: each process's rows need their own number of teacher calls; on a sharded base
    the processes pad to the most, and the LoRA is the unsharded run's (which pads nothing)."""
    cfg = yaml.safe_load(recipe_file.read_text())
    cfg |= {"grid_every_stage": False, "stages": [{"name": "t1", "segments": 1, "batch": 2, "steps": 4,
                                                   "solve_below": 900, "solve_stride": 2}]}
    recipe = tmp_path / "solve.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    _launch(recipe, tmp_path / "plain", False)
    _launch(recipe, tmp_path / "sharded", True, program=_worker(tmp_path, SOLVE_CALLS))
    counts = _seen(tmp_path / "sharded")
    assert len(counts[0]) == len(counts[1]) == 4 and counts[0] != counts[1] and max(map(max, counts)) > 1
    plain, sharded = _lora(tmp_path / "plain"), _lora(tmp_path / "sharded")
    assert any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)
    assert max((plain[k] - sharded[k]).abs().max().item() for k in plain) < 1e-5
