import pytest
import torch
from safetensors.torch import load_file

from hypersd.cli import main
from hypersd.errors import HypersdError
from hypersd.train.recipe import from_dict, load_recipe
from hypersd.train.trainer import Distiller


def tiny_recipe(teacher_file, **kw):
    raw = {"teacher": str(teacher_file), "lora_rank": 4, "checkpoint_every": 3, "checkpoint_keep": 2,
           "grid_every_stage": False, "eval_steps": [1],
           "stage_defaults": {"batch": 2, "steps": 4},
           "stages": [{"name": "a", "segments": 2}, {"name": "b", "segments": 1, "adv_weight": 0.1}]}
    raw.update(kw)
    return from_dict(raw)


def assert_resume_matches(make, folder, want: dict, *kill_at: int) -> None:
    """A run "killed" at each global step of ``kill_at`` in turn, each time resumed from its last
    checkpoint (one run killed and resumed several times: a wrong resume anywhere shows at the
    end), ends on the same LoRA as ``want``."""
    import json

    from hypersd.train.checkpoint import list_checkpoints

    for i, kill in enumerate(kill_at):
        part = Distiller(make(), folder, progress=False)
        restored = json.loads((list_checkpoints(folder / "checkpoints")[-1] / "state.json").read_text()) if i else {}
        assert not part.run(resume=bool(i), max_steps=kill - restored.get("global_step", 0))
    again = Distiller(make(), folder, progress=False)
    assert again.run(resume=True)
    got = load_file(str(again.finish()))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-5), (kill_at, k)


def test_killed_run_resumes_to_the_same_lora(tmp_path, random_teacher_file):
    full = Distiller(tiny_recipe(random_teacher_file), tmp_path / "full", progress=False)
    assert full.run()
    want = load_file(str(full.finish()))
    # "killed" in stage b, after the checkpoint at step 3
    assert_resume_matches(lambda: tiny_recipe(random_teacher_file), tmp_path / "part", want, 5)
    assert (tmp_path / "part" / "stages" / "a" / "lora.safetensors").is_file()


def test_resume_from_another_recipe_is_refused(tmp_path, random_teacher_file):
    Distiller(tiny_recipe(random_teacher_file), tmp_path, progress=False).run(max_steps=3)
    other = tiny_recipe(random_teacher_file, seed=7)
    with pytest.raises(HypersdError, match="another recipe"):
        Distiller(other, tmp_path, progress=False).run(resume=True)


def test_nan_loss_is_skipped_counted_and_not_learned(tmp_path, random_teacher_file):
    d = Distiller(tiny_recipe(random_teacher_file), tmp_path, progress=False)
    before = [p.detach().clone() for p in d.student]
    d.data.batch = lambda n, g: (torch.full((n, 1, 8, 8), float("nan")), ["a handwritten digit one"] * n)
    d.run()
    assert d.stats["nan_skipped"] == 8
    assert d.stats["stages"]["a"]["skipped"] == {"student": 4}  # by optimizer; the discriminator never stepped
    assert all(torch.equal(a, b) for a, b in zip(before, d.student))


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(HypersdError, match=r"unknown key\(s\) \['segmnts'\]"):
        from_dict({"stages": [{"name": "x", "segmnts": 4}]})
    with pytest.raises(HypersdError, match="unknown stage kind 'magic'"):
        from_dict({"stages": [{"name": "x", "kind": "magic"}]})
    with pytest.raises(HypersdError, match="no stages"):
        from_dict({"seed": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(HypersdError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(HypersdError, match="data pipeline"):
        Distiller(from_dict({"backbone": "sdxl", "stages": [{"name": "x"}]}), tmp_path)
    r = load_recipe("digits")
    assert [s.kind for s in r.stages] == ["tscd"] * 4 + ["feedback", "merge", "dmd"]
    assert [s.segments for s in r.stages if s.kind == "tscd"] == [8, 4, 2, 1]
    # the one-step generator below t = 999, where x0 from ε amplifies its error 15x (docs/RESULTS.md)
    assert r.stages[-1].generator_t == 800


def test_distill_command_dry_run_and_refusal(tmp_path, random_teacher_file, capsys):
    assert main(["distill", "--dry-run"]) == 0
    assert "tscd-8" in capsys.readouterr().out
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"teacher: {random_teacher_file}\nlora_rank: 4\ngrid_every_stage: false\neval_steps: [1, 2]\n"
                   "eval_n: 20\neval_seeds: 1\nstages:\n  - {name: s, segments: 2, steps: 2, batch: 4}\n")
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg), "--out", str(out)]) == 0
    assert f"log: {out / 'log.jsonl'}" in capsys.readouterr().out  # where the log is, how to read it
    assert (out / "lora.safetensors").is_file() and (out / "metrics.json").is_file()
    assert (out / "samples-2step.png").is_file()
    before = (out / "lora.safetensors").read_bytes()
    assert main(["distill", "--config", str(cfg), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "lora.safetensors").read_bytes() == before
    assert main(["distill", "--config", str(cfg), "--out", str(out), "--force", "--no-eval"]) == 0
    runs = [line for line in (out / "log.jsonl").read_text().splitlines() if '"run_start"' in line]
    assert len(runs) == 1  # starting over starts a new log
    assert main(["sample", "--teacher", str(random_teacher_file), "--lora", str(out / "lora.safetensors"),
                 "--steps", "2", "--n", "10", "--out", str(tmp_path / "s.npz")]) == 0


FULL_STAGES = [{"name": "t", "segments": 2},
               {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits", "alpha": -0.1}],
                "perceptual_weight": 1.0},
               {"name": "m", "kind": "merge", "ratio": 0.5},
               {"name": "d", "kind": "dmd", "fake_warmup": 2, "fake_updates": 2, "reg_pool": 8, "reg_steps": 2,
                "reg_batch": 2, "generator_t": 800, "keep_weight": 1.0}]


# DMD with DMD2's GAN term, its heads trained fast enough that a resume without their state shows
FULL_STAGES_GAN = [*FULL_STAGES[:-1], {**FULL_STAGES[-1], "gan_weight": 0.1, "gan_hidden": 8, "fake_lr": 1e-2}]


def test_full_recipe_runs_every_kind_and_resumes_inside_each(tmp_path, random_teacher_file):
    from hypersd import lora

    make = lambda: tiny_recipe(random_teacher_file, stages=FULL_STAGES_GAN)  # noqa: E731
    full = Distiller(make(), tmp_path / "full", progress=False)
    assert full.run()
    want = load_file(str(full.finish()))
    stages = tmp_path / "full" / "stages"
    fb, meta = lora.read_lora(stages / "fb" / "feedback.safetensors")
    assert meta["rank"] == 4 and any(v.abs().sum() > 0 for k, v in fb.items() if "lora_B" in k)  # it learned
    merged, meta = lora.read_lora(stages / "m" / "lora.safetensors")
    assert meta["rank"] == 8 and want.keys() == merged.keys()  # the unified LoRA: ranks stacked
    assert "one_step_t" not in meta and lora.read_lora(full.out / "lora.safetensors")[1]["one_step_t"] == 800
    assert any(not torch.equal(want[k], merged[k]) for k in want)  # DMD trained it further
    assert_resume_matches(make, tmp_path / "part", want, 6, 8, 10)  # killed inside feedback, at its end, inside DMD


def test_stage_order_and_inputs_are_checked(tmp_path):
    fb = {"name": "fb", "kind": "feedback", "perceptual_weight": 1.0}
    with pytest.raises(HypersdError, match="needs a distilled LoRA"):
        from_dict({"stages": [fb]})
    from_dict({"init_lora": "x.safetensors", "stages": [fb]})  # a LoRA from an earlier run serves
    with pytest.raises(HypersdError, match="nothing to merge"):
        from_dict({"stages": [{"name": "t"}, {"name": "m", "kind": "merge"}]})
    with pytest.raises(HypersdError, match="needs rewards or a perceptual_weight"):
        from_dict({"stages": [{"name": "t"}, {"name": "fb", "kind": "feedback"}]})
    with pytest.raises(HypersdError, match=r"unknown key\(s\) \['segments'\] in config: stage 'd' \(kind dmd\)"):
        from_dict({"stages": [{"name": "t"}, {"name": "d", "kind": "dmd", "segments": 2}]})
    with pytest.raises(HypersdError, match="reward 'digits'"):
        from_dict({"stages": [{"name": "t"}, {**fb, "rewards": [{"name": "digits", "alpah": 1}]}]})
    with pytest.raises(HypersdError, match="LoRA file .* not found"):
        Distiller(from_dict({"init_lora": str(tmp_path / "none.safetensors"), "stages": [fb]}), tmp_path)


def test_set_reaches_nested_keys_and_stages_by_name():
    from hypersd.train.recipe import load_recipe

    r = load_recipe("digits", ["stage_defaults.lr=0.125", "stages.tscd-1.steps=7", "lora_rank=8"])
    assert r.lora_rank == 8
    assert {s.name: s.steps for s in r.stages}["tscd-1"] == 7
    assert all(s.lr == 0.125 for s in r.stages if s.kind == "tscd")  # no tscd stage sets its own lr
    with pytest.raises(HypersdError, match="no stage named 'tscd-9'"):
        load_recipe("digits", ["stages.tscd-9.steps=1"])
    with pytest.raises(HypersdError, match="stages.NAME.steps"):
        load_recipe("digits", ["stages.steps=1"])


def test_a_reward_that_cannot_load_stops_the_run_before_its_first_step(tmp_path):
    from hypersd.train.recipe import from_dict
    from hypersd.train.trainer import Distiller

    recipe = from_dict({"stages": [
        {"name": "t", "segments": 2, "steps": 1, "batch": 2},
        {"name": "fb", "kind": "feedback", "steps": 1, "batch": 2,
         "rewards": [{"name": "digits", "path": str(tmp_path / "missing.safetensors")}]}]})
    with pytest.raises(HypersdError, match="stage 'fb'.*missing.safetensors"):
        Distiller(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_fp8_teacher_key_runs_the_training_teacher_passes_in_fp8(tmp_path, random_teacher_file, monkeypatch):
    from hypersd.nets import fp8

    calls = []
    plain_fp8 = fp8.Float8Linear._fp8_forward
    monkeypatch.setattr(fp8.Float8Linear, "_fp8_forward", lambda self, x: calls.append(1) or plain_fp8(self, x))
    d = Distiller(tiny_recipe(random_teacher_file, fp8_teacher=True), tmp_path, progress=False)
    layers = [m for m in d.teacher.unet.modules() if isinstance(m, fp8.Float8Linear)]
    assert layers  # the digits UNet's linear layers are multiples of 16 wide
    assert d.run(max_steps=2) is False  # stopped by max_steps, not finished
    assert len(calls) >= 2 * len(layers)  # each step's teacher pass went through every FP8 layer
    plain = Distiller(tiny_recipe(random_teacher_file), tmp_path / "plain", progress=False)
    assert not any(isinstance(m, fp8.Float8Linear) for m in plain.teacher.unet.modules())


def _nan_from(fn, call: int):
    """``fn``, whose loss turns NaN from its ``call``-th call on."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        out = fn(*args, **kwargs)
        if calls[0] < call:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    return wrapped


DMD = {"name": "d", "kind": "dmd", "fake_warmup": 1, "fake_updates": 1, "reg_pool": 4, "reg_steps": 2, "reg_batch": 2}
# role: (its stages, the stage it stops in, the loss turned NaN, the step the run stops at); the
# NaNs begin at that loss's third call, after the checkpoint at global step 2 (student and
# discriminator: a call a step; fake: the warm-up's update, then one a step)
BAD_LOSSES = {"student": ([{"name": "a", "segments": 2}], "a", "TSCDRun.loss", 4),
              "discriminator": ([{"name": "a", "segments": 2, "adv_weight": 0.1}], "a", "hinge_d_loss", 4),
              "fake": ([{"name": "t", "segments": 1, "steps": 1}, DMD], "d", "denoising_loss", 3)}


@pytest.mark.parametrize("role", BAD_LOSSES)
def test_a_nan_in_any_optimizers_loss_is_refused_counted_and_stops_the_run(role, tmp_path, random_teacher_file,
                                                                           monkeypatch):
    from hypersd.train import stages as stages_module
    from hypersd.train.checkpoint import list_checkpoints

    stages, stage, target, stop_at = BAD_LOSSES[role]
    make = lambda: tiny_recipe(random_teacher_file, stages=stages, checkpoint_every=2, max_bad_steps=2,  # noqa: E731
                               stage_defaults={"batch": 4, "steps": 4})
    owner, name = stages_module, target
    if "." in target:
        kind, name = target.split(".")
        owner = getattr(stages_module, kind)
    monkeypatch.setattr(owner, name, _nan_from(getattr(owner, name), 3))
    d = Distiller(make(), tmp_path, progress=False)
    first_bad = {}  # the weights the role's first NaN step met
    plain_step = d.rt.step

    def step(loss, opt, params, clip=None, role="student"):
        params = list(params)
        if not torch.isfinite(loss) and role not in first_bad:
            first_bad[role] = (params, [p.detach().clone() for p in params])
        return plain_step(loss, opt, params, clip, role)

    d.rt.step = step
    with pytest.raises(HypersdError, match=rf"stage '{stage}', step {stop_at}/4: the {role} optimizer's last 2 steps"):
        d.run()
    assert list(first_bad) == [role]
    params, before = first_bad[role]
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing stepped into them
    assert d.stats["stages"][stage]["skipped"] == {role: 2}
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    last = load_file(str(ckpts[-1] / "lora-student.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values())
    monkeypatch.undo()  # the cause fixed: the run resumes from its last checkpoint and finishes
    again = Distiller(make(), tmp_path, progress=False)
    assert again.run(resume=True)
    assert again.stats["stages"][stage]["skipped"] == {}  # the checkpoint's count: from before the NaNs


def test_max_bad_steps_is_checked_and_leaves_the_fingerprint_alone():
    base = {"stages": [{"name": "t"}]}
    assert from_dict(base).max_bad_steps == 20
    assert from_dict(base).fingerprint() == from_dict(base | {"max_bad_steps": 3}).fingerprint()  # a safety setting
    for bad in (0, True, 2.5):
        with pytest.raises(HypersdError, match="max_bad_steps must be (a whole number|>= 1)"):
            from_dict(base | {"max_bad_steps": bad})


def test_a_fake_score_blown_up_by_its_rate_stops_the_run_and_names_it(tmp_path, random_teacher_file):
    """A fake_lr of 1e30 once made every step NaN while the run counted them and ended with exit 0."""
    recipe = tiny_recipe(random_teacher_file, max_bad_steps=2, stages=[
        {"name": "t", "segments": 1, "steps": 1}, {**DMD, "fake_lr": 1.0e30, "fake_warmup": 2, "steps": 10}])
    d = Distiller(recipe, tmp_path, progress=False)
    with pytest.raises(HypersdError, match=r"stage 'd', step 2/10: .* refused in this stage: fake 1, student 2\)"
                                           r".* lower the stage's fake_lr or lr"):
        d.run()
    assert not (tmp_path / "lora.safetensors").exists()


def test_a_finished_run_resumed_samples_with_the_student_not_the_fake_score(tmp_path, random_teacher_file):
    from hypersd import lora

    stages = [{"name": "t", "segments": 1, "steps": 1},
              {"name": "d", "kind": "dmd", "steps": 1, "fake_warmup": 1, "fake_updates": 1, "reg_pool": 4,
               "reg_steps": 2, "reg_batch": 2}]
    done = Distiller(tiny_recipe(random_teacher_file, stages=stages), tmp_path, progress=False)
    assert done.run()
    again = Distiller(tiny_recipe(random_teacher_file, stages=stages), tmp_path, progress=False)
    assert again.run(resume=True)
    # the grids and the recommended eta sample the UNet as it is: it must be the final LoRA
    assert lora.active(again.teacher.unet) == [lora.STUDENT]


def test_a_finished_run_resumed_keeps_the_adapters_it_ended_with(tmp_path, random_teacher_file):
    """tscd -> feedback -> dmd (no merge): DMD trains the student alone, so the final LoRA is the
    student's; a resume of the finished run must not put the unmerged feedback LoRA back on it."""
    from hypersd import lora

    stages = [{"name": "t", "segments": 1, "steps": 1},
              {"name": "fb", "kind": "feedback", "steps": 1, "rewards": [{"name": "digits"}], "sample_steps": [1]},
              {"name": "d", "kind": "dmd", "steps": 1, "fake_warmup": 1, "fake_updates": 1, "reg_pool": 4,
               "reg_steps": 2, "reg_batch": 2}]
    done = Distiller(tiny_recipe(random_teacher_file, stages=stages), tmp_path, progress=False)
    assert done.run()
    ended = lora.active(done.teacher.unet)
    again = Distiller(tiny_recipe(random_teacher_file, stages=stages), tmp_path, progress=False)
    assert again.run(resume=True)
    assert lora.active(again.teacher.unet) == ended == [lora.STUDENT]


def test_a_digits_teacher_reads_v_prediction_and_refuses_an_unknown_output():
    from hypersd.teachers.digits import SCHEDULER_CONFIG, DigitsTeacher

    teacher = DigitsTeacher.new()
    v = DigitsTeacher(teacher.unet, teacher.text, {**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    assert v.schedule.prediction_type == "v_prediction"
    with pytest.raises(HypersdError, match="unknown prediction_type 'sample'"):
        DigitsTeacher(teacher.unet, teacher.text, {**SCHEDULER_CONFIG, "prediction_type": "sample"})
