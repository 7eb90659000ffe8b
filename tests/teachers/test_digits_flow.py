"""The digits world's rectified-flow teacher: its file, its network call, its training, a distill on it."""

import math

import pytest
import torch

from hypersd import lora
from hypersd.core.noise import FlowSchedule
from hypersd.digits.train_teacher import train_teacher
from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher
from hypersd.teachers.digits_flow import FlowDigitsTeacher
from hypersd.train import runlog
from hypersd.train.recipe import from_dict
from hypersd.train.trainer import Distiller


def _inputs(teacher, n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n, *teacher.latent_shape), generator=g)
    return x, teacher.encode_prompt(["a handwritten digit seven"] * n)


def test_teacher_file_round_trips_weights_schedule_and_guidance(flow_file):
    a = FlowDigitsTeacher.load(flow_file)
    b = load_teacher("digits-flow", str(flow_file))
    assert isinstance(b, FlowDigitsTeacher) and b.default_guidance == 2.5 and b.fingerprint == a.fingerprint
    sched = b.schedule
    assert isinstance(sched, FlowSchedule) and (sched.shift, sched.timestep_scale, sched.spacing, b.T) == (
        1.0, 1000.0, "trailing", 1000)
    x, cond = _inputs(a)
    t = torch.tensor([999, 500, 0])
    assert torch.equal(a.eps(x, t, cond), b.eps(x, t, cond))
    # the saved weights are the trained ones, not a fresh init
    fresh = FlowDigitsTeacher.new(seed=1)
    assert not torch.equal(fresh.eps(x, t, fresh.encode_prompt(["a handwritten digit seven"] * 3)), a.eps(x, t, cond))


def test_a_wrong_or_missing_file_is_refused(tmp_path, flow_file, random_teacher_file):
    with pytest.raises(HypersdError, match="not a hypersd digits flow teacher file.*'digits-teacher'"):
        FlowDigitsTeacher.load(random_teacher_file)  # the DDPM teacher's file
    with pytest.raises(HypersdError, match="not a hypersd digits teacher file.*'digits-flow-teacher'"):
        load_teacher("digits", str(flow_file))
    with pytest.raises(HypersdError, match="not found"):
        FlowDigitsTeacher.load(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(HypersdError):
        FlowDigitsTeacher.load(bad)


def test_the_network_is_called_with_1000_sigma_not_t(flow_file):
    teacher = FlowDigitsTeacher.load(flow_file)
    seen = []
    hook = teacher.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["timestep"].clone()),
                                                  with_kwargs=True)
    x, cond = _inputs(teacher)
    t = torch.tensor([999, 399, 0])
    teacher.eps(x, t, cond)
    hook.remove()
    assert torch.allclose(seen[0], torch.tensor([1000.0, 400.0, 1.0]))
    assert torch.allclose(seen[0], teacher.schedule.model_timestep(t))


def test_one_euler_jump_is_x_plus_dsigma_v(flow_file):
    teacher = FlowDigitsTeacher.load(flow_file)
    x, cond = _inputs(teacher, 1)
    v = teacher.eps(x, 799, cond)
    sched = teacher.schedule
    got = sched.jump(x, v, 799, 399)
    assert torch.allclose(got, x + (0.4 - 0.8) * v, atol=1e-6)
    assert torch.allclose(sched.jump(x, v, 799, -1), x - 0.8 * v, atol=1e-6)  # to the clean end: x̂0


def _flow_loss(teacher, x0, noise, t, cond):
    sched = teacher.schedule
    with torch.no_grad():
        return torch.nn.functional.mse_loss(teacher.eps(sched.add_noise(x0, noise, t), t, cond),
                                            sched.target(x0, noise, t)).item()


def test_training_loss_falls_on_a_fresh_tiny_model(tmp_path):
    """The rectified-flow loss (target v = ε − x0) through the same loop as the DDPM teacher's,
    measured on one fixed held-out batch before and after a few steps."""
    from hypersd.digits import data

    teacher = FlowDigitsTeacher(FlowDigitsTeacher.build_network({**FlowDigitsTeacher.NET_CONFIG, "num_layers": 1}),
                                FlowDigitsTeacher.new(0).text, FlowDigitsTeacher.SCHEDULE_CONFIG)
    x, y = data.load("test")
    g = torch.Generator().manual_seed(0)
    x0, noise, t = x[:256], torch.randn(x[:256].shape, generator=g), torch.randint(0, 1000, (256,), generator=g)
    cond = teacher.encode_prompt(data.prompts_for(y[:256]))
    before = _flow_loss(teacher, x0, noise, t, cond)
    out = tmp_path / "t.safetensors"
    trained = train_teacher(out, steps=12, batch=16, lr=5e-2, ema_decay=0.0, progress=False, teacher=teacher)
    assert _flow_loss(trained, x0, noise, t, cond) < 0.8 * before
    assert FlowDigitsTeacher.load(out).info["steps"] == 12


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(HypersdError, match="unknown teacher family 'edm'"):
        train_teacher(tmp_path / "t.safetensors", steps=1, family="edm", progress=False)


def _tiny_flow_recipe(teacher_file, stages):
    return from_dict({"backbone": "digits-flow", "teacher": str(teacher_file), "lora_rank": 4,
                      "checkpoint_every": 100, "grid_every_stage": False, "eval_steps": [1],
                      "eval_etas": [0.0], "eval_n": 10, "eval_seeds": 1, "stage_defaults": {"batch": 4, "steps": 2}, "stages": stages})


def test_tiny_distill_on_the_flow_teacher_writes_a_lora(tmp_path, flow_file):
    d = Distiller(_tiny_flow_recipe(flow_file, [{"name": "a", "segments": 2}]), tmp_path, progress=False)
    assert d.run()
    path = d.finish()
    state, meta = lora.read_lora(path)
    assert meta["backbone"] == "digits-flow" and any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)


@pytest.mark.slow
def test_every_stage_kind_runs_on_the_flow_teacher(tmp_path, flow_file):
    from test_trainer import FULL_STAGES

    d = Distiller(_tiny_flow_recipe(flow_file, FULL_STAGES), tmp_path, progress=False)
    assert d.run()
    assert lora.read_lora(d.finish())[1]["one_step_t"] == 800


def test_cli_trains_and_samples_the_flow_teacher(tmp_path, flow_file, capsys):
    import numpy as np

    from hypersd.cli import main

    out = tmp_path / "t.safetensors"
    assert main(["teacher", "train", "--family", "flow", "--steps", "2", "--batch", "4", "--out", str(out)]) == 0
    assert FlowDigitsTeacher.load(out).info["steps"] == 2
    npz = tmp_path / "s.npz"
    assert main(["sample", "--backbone", "digits-flow", "--teacher", str(flow_file), "--steps", "2", "--n", "4",
                 "--out", str(npz)]) == 0
    assert np.load(npz)["images"].shape == (4, 1, 8, 8)
    capsys.readouterr()
    # the flow file under the DDPM backbone: one clear line naming the kinds
    assert main(["sample", "--teacher", str(flow_file), "--steps", "2", "--n", "4", "--out", str(tmp_path / "u.npz")]) == 2
    assert "digits-flow-teacher" in capsys.readouterr().err
    # eval reads the file's kind: the flow teacher is judged as the flow world
    assert main(["eval", "--teacher", str(flow_file), "--steps", "1", "--n", "10", "--seeds", "1",
                 "--out-dir", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "baseline.json").is_file()


def test_a_tscd_stage_with_the_adversarial_term_runs_on_the_transformer(tmp_path, flow_file):
    recipe = _tiny_flow_recipe(flow_file, [{"name": "a", "segments": 1, "adv_weight": 0.1, "d_hidden": 16}])
    d = Distiller(recipe, tmp_path, progress=False)
    assert d.run()
    state, meta = lora.read_lora(d.finish())
    assert meta["backbone"] == "digits-flow" and any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    done = [r for r in runlog.steps(runlog.read(tmp_path)) if not r["skipped"]]
    assert len(done) == 2  # each step: the generator's adversarial term and a discriminator step
    assert all(math.isfinite(r["losses"]["g"]) and math.isfinite(r["losses"]["d"]) for r in done)


def test_sample_command_honours_eta_on_the_flow_teacher(flow_file, tmp_path):
    """'hypersd sample --backbone digits-flow --eta' runs the flow TCD step (σ_s = (1−γ)·σ_next, then
    re-noising) through sample_prompts, the sampler the metrics and the eta scan use."""
    import numpy as np

    from hypersd.cli import main
    from hypersd.core.sampling import sample_prompts
    from hypersd.digits.data import balanced_labels, prompts_for

    out = {}
    for eta in (0.0, 0.5):
        path = tmp_path / f"eta{eta}.npz"
        assert main(["sample", "--backbone", "digits-flow", "--teacher", str(flow_file), "--steps", "4", "--eta",
                     str(eta), "--n", "6", "--guidance", "1", "--out", str(path)]) in (0, None)
        out[eta] = torch.from_numpy(np.load(path)["images"])
    t = load_teacher("digits-flow", str(flow_file))
    prompts = prompts_for(balanced_labels(6))
    with torch.no_grad():
        ref = t.decode(sample_prompts(t, prompts, 4, guidance=1.0, eta=0.5, seed=0))
    assert (out[0.5] - ref).abs().max() < 1e-5 and (out[0.5] - out[0.0]).abs().max() > 1e-3
