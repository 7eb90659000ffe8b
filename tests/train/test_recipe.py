"""Loading a recipe refuses, by stage and key, whatever its stages would refuse when they start."""

import copy

import pytest

from hypersd.errors import HypersdError
from hypersd.train.recipe import from_dict, load_recipe

TSCD = {"name": "t", "segments": 2}
FEEDBACK = {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits"}]}
DMD = {"name": "d", "kind": "dmd", "keep_weight": 1.0}


def _recipe(*stages, **top):
    return from_dict({"stages": [TSCD, *stages], **top})


@pytest.mark.parametrize("stage, message", [
    ({"name": "late", "segments": 3, "solver_steps": 50},
     "stage 'late': segments 3 with solver_steps 50: 3 steps do not"),
    ({"name": "late", "segments": 8, "solver_steps": 50}, r"stage 'late': segments 8 with solver_steps 50: segment "
                                                          r"boundaries \[874, "),
    ({"name": "late", "solver_steps": 30}, "stage 'late': solver_steps 30: 30 steps do not divide"),
])
def test_segments_the_solver_grid_cannot_serve_fail_at_load(stage, message):
    with pytest.raises(HypersdError, match=message):
        _recipe(stage)


@pytest.mark.parametrize("stage, message", [
    ({**DMD, "keep_steps": [2, 3]}, "stage 'd': keep_steps 3: 3 steps do not divide the 1000"),
    ({**DMD, "keep_steps": [1]}, r"stage 'd': keep_steps \[1\] have no timestep but generator_t 999"),
    ({**DMD, "reg_steps": 30}, "stage 'd': reg_steps 30"),
    ({**FEEDBACK, "sample_steps": [1, 3]}, "stage 'fb': sample_steps 3: 3 steps do not divide"),
    ({**FEEDBACK, "sample_steps": [1], "t_range": [0, 500]}, "stage 'fb': no step .* in t_range"),
    ({**FEEDBACK, "rank": 0}, "stage 'fb': rank must be a whole number >= 1"),
    ({**FEEDBACK, "perceptual_weight": 1.0, "perceptual_model": "vgg"}, "stage 'fb': perceptual_model 'vgg'"),
    ({**FEEDBACK, "rewards": [{"name": "digitz"}]}, "stage 'fb': reward 'digitz': unknown reward"),
    ({**DMD, "fake_rank": 0}, "stage 'd': fake_rank must be a whole number >= 1"),
    ({**DMD, "fake_lr": -1e-3}, "stage 'd': fake_lr must be >= 0"),
])
def test_what_a_later_stage_would_refuse_when_it_starts_fails_at_load(stage, message):
    with pytest.raises(HypersdError, match=message):
        _recipe(stage)


def test_recipe_wide_values_the_trainer_needs_are_checked_at_load():
    for top, message in [({"eval_steps": [1, 3]}, "eval_steps 3"), ({"lora_rank": 0}, "lora_rank must be"),
                         ({"lora_targets": "attention"}, "lora_targets 'attention' is not a preset"),
                         ({"checkpoint_every": 0}, "checkpoint_every must be >= 1")]:
        with pytest.raises(HypersdError, match=message):
            _recipe(**top)


def test_a_number_yaml_reads_as_a_string_loads_as_that_number(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("stage_defaults: {lr: 3e-4}\n"
                   "stages:\n  - {name: t, segments: 2, lr: 1e-4, huber_c: 1.0e30, guidance: [1e0, 2]}\n"
                   "  - {name: u, segments: 1}\n")
    r = load_recipe(cfg, ["stages.u.d_lr=2E+2"])
    t, u = r.stages
    assert type(t.lr) is float and t.lr == 1e-4 and t.huber_c == 1e30 and t.guidance == [1.0, 2]
    assert type(u.lr) is float and u.lr == 3e-4 and u.d_lr == 200.0
    assert "lr: 0.0001" in r.dump()  # what --dry-run prints and a checkpoint's fingerprint holds


@pytest.mark.parametrize("where, key, value, message", [
    ("stage", "lr", "abc", r"stage 't': lr must be a number \(float\), got 'abc'"),
    ("stage", "lr", "1e-4x", r"lr must be a number \(float\), got '1e-4x'"),
    ("stage", "steps", 2.5, r"stage 't': steps must be a whole number \(int\), got 2.5"),
    ("stage", "batch", True, r"batch must be a whole number \(int\), got True"),
    ("stage", "guidance", [1.0, "x"],
     r"guidance must be a list of numbers \(list\[float\]\) or null, got \[1.0, 'x'\]"),
    ("stage", "guidance", 2.0, r"guidance must be a list of numbers"),
    ("stage", "end", 3, r"end must be a string \(str\), got 3"),
    ("defaults", "lr", "fast", r"stage_defaults \(for stage 't'\): lr must be a number"),
    ("top", "eval_steps", [1, 2.0], r"config: eval_steps must be a list of whole numbers \(list\[int\]\)"),
    ("top", "seed", "0", r"config: seed must be a whole number \(int\), got '0'"),
    ("top", "lora_targets", 3, r"lora_targets must be a string \(str\) or a list of strings"),
    ("reward", "weight", "heavy", r"stage 'fb': reward 'digits': weight must be a number \(float\), got 'heavy'"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_key_and_type(where, key, value, message):
    raw = {"stages": [dict(TSCD), {**FEEDBACK, "rewards": [{"name": "digits"}]}]}
    target = {"stage": raw["stages"][0], "top": raw, "reward": raw["stages"][1]["rewards"][0]}
    if where == "defaults":
        raw["stage_defaults"] = {key: value}
    else:
        target[where][key] = value
    with pytest.raises(HypersdError, match=message):
        from_dict(raw)


# -- on the teacher's own schedule: a flow teacher's σ grid ---------------------------------------
@pytest.fixture(autouse=True)
def _flow_backbone():
    """A backbone whose schedule only its loaded teacher knows (as a flow model's shift)."""
    from hypersd.backbones import BACKBONES, DigitsBackbone, register

    class FlowUnderTest(DigitsBackbone):
        name = "flow-under-test"

        def named_schedule(self):
            return None

    register(FlowUnderTest())
    yield
    BACKBONES.pop("flow-under-test", None)


def _flow_recipe(*stages, **top):
    """A recipe of a backbone whose schedule is not known by name: checked once its teacher loads."""
    return from_dict({"backbone": "flow-under-test", "stages": list(stages), **top})


FLOW_TSCD = {"name": "t", "segments": 8, "solver_steps": 43}


def _sd3():
    from hypersd.core import FlowSchedule

    return FlowSchedule(shift=3.0, timestep_scale=1000.0, spacing="inclusive")


def test_a_flow_recipe_is_checked_on_the_teachers_inclusive_grid():
    from hypersd.train.recipe import check_timesteps

    dmd = {"name": "d", "kind": "dmd", "t_range": [20, 820], "generator_t": 840, "reg_steps": 21}
    ok = _flow_recipe(FLOW_TSCD, dmd, eval_steps=[1, 2, 4, 8])
    check_timesteps(ok, "recipe", _sd3())  # N=43 holds the boundaries of k = 1, 2, 4, 8 on T=841
    with pytest.raises(HypersdError, match="1000 training timesteps"):  # the DDPM grid cannot serve it
        check_timesteps(from_dict({"stages": [{"name": "t", "segments": 8, "solver_steps": 43}]}))
    with pytest.raises(HypersdError, match=r"stage 't': solver_steps 40: 40 points do not split the 840 intervals"
                                           r".*N=43"):  # the DDPM default N=40 is no inclusive grid
        check_timesteps(_flow_recipe({"name": "t", "segments": 4}), "recipe", _sd3())
    with pytest.raises(HypersdError, match=r"stage 't': segments 8 with solver_steps 13: .*not on the N=13 "
                                           r"solver grid \(T=841, inclusive spacing\); .*N=43"):
        check_timesteps(_flow_recipe({"name": "t", "segments": 8, "solver_steps": 13}), "recipe", _sd3())
    with pytest.raises(HypersdError, match="eval_steps 10: 10 points do not split the 840 intervals"):
        check_timesteps(_flow_recipe(FLOW_TSCD, eval_steps=[10]), "recipe", _sd3())
    with pytest.raises(HypersdError, match=r"stage 'd': t_range \[20, 980\] is outside the timesteps 0..840 of "
                                           r"the teacher's schedule \(T=841, inclusive spacing\)"):
        check_timesteps(_flow_recipe(FLOW_TSCD, {"name": "d", "kind": "dmd"}), "recipe", _sd3())
    with pytest.raises(HypersdError, match="generator_t 999 is outside the timesteps 0..840"):
        check_timesteps(_flow_recipe(FLOW_TSCD, {"name": "d", "kind": "dmd", "t_range": [20, 820]}), "recipe",
                        _sd3())


def test_a_flow_recipe_off_the_grid_is_refused_when_its_teacher_loads(random_teacher_file, tmp_path):
    from hypersd.teachers.digits import DigitsTeacher
    from hypersd.train.trainer import Distiller

    class OnFlow(DigitsTeacher):  # the digits network, read on SD3's σ grid
        schedule = _sd3()

    teacher = DigitsTeacher.load(random_teacher_file)
    teacher.__class__ = OnFlow
    recipe = _flow_recipe({"name": "t", "segments": 8, "solver_steps": 13, "steps": 1, "batch": 2},
                          teacher=str(random_teacher_file), eval_steps=[1], grid_every_stage=False, lora_rank=4)
    with pytest.raises(HypersdError, match=r"segments 8 with solver_steps 13: .*T=841, inclusive"):
        Distiller(recipe, tmp_path, progress=False, teacher=teacher)


FLAT_RUN_EVAL = {"device": "cpu", "mixed_precision": "bf16", "gradient_checkpointing": True, "channels_last": True,
                 "compile": True, "tf32": False, "optimizer": "adamw8bit", "fp8_teacher": True, "checkpoint_every": 7,
                 "checkpoint_keep": 5, "max_bad_steps": 3, "eval_steps": [1, 2], "eval_etas": [0.0, 0.5],
                 "eval_n": 20, "eval_seeds": 2, "grid_every_stage": False}
SECTIONED_RUN_EVAL = {"run": {"device": "cpu", "mixed_precision": "bf16", "gradient_checkpointing": True,
                              "channels_last": True, "compile": True, "tf32": False, "optimizer": "adamw8bit",
                              "fp8_teacher": True, "checkpoint_every": 7, "checkpoint_keep": 5, "max_bad_steps": 3},
                      "eval": {"steps": [1, 2], "etas": [0.0, 0.5], "n": 20, "seeds": 2, "grid_every_stage": False}}


def test_flat_keys_and_sections_give_the_same_recipe(tmp_path):
    flat, sectioned = _recipe(**FLAT_RUN_EVAL), _recipe(**SECTIONED_RUN_EVAL)
    assert flat == sectioned and flat.run.checkpoint_every == 7 and flat.eval.steps == [1, 2]
    assert flat.eval_steps == [1, 2] and flat.max_bad_steps == 3  # a flat name reads its section
    flat.checkpoint_every = 9
    assert flat.run.checkpoint_every == 9
    assert copy.deepcopy(flat) == flat and copy.deepcopy(flat).eval_n == 20
    half = {"eval_steps": [1, 2], "run": {"checkpoint_every": 7}}  # one file may mix the two
    assert _recipe(**half).eval.steps == [1, 2] and _recipe(**half).run.checkpoint_every == 7
    with pytest.raises(HypersdError, match="eval_steps and eval.steps are the same setting; keep one"):
        _recipe(eval_steps=[1], eval={"steps": [2]})
    with pytest.raises(HypersdError, match=r"unknown key\(s\) \['stepz'\] in config: eval"):
        _recipe(eval={"stepz": [1]})
    with pytest.raises(HypersdError, match=r"config: run: checkpoint_every must be a whole number"):
        _recipe(run={"checkpoint_every": "often"})


def test_set_takes_either_form_on_either_file(tmp_path):
    stages = "stages:\n  - {name: t, segments: 2}\n"
    (tmp_path / "flat.yaml").write_text("eval_steps: [1]\ncheckpoint_every: 3\n" + stages)
    (tmp_path / "sectioned.yaml").write_text("eval: {steps: [1]}\nrun: {checkpoint_every: 3}\n" + stages)
    for name in ("flat", "sectioned"):
        for sets in (["eval_steps=[2, 4]", "checkpoint_every=5"], ["eval.steps=[2, 4]", "run.checkpoint_every=5"]):
            r = load_recipe(tmp_path / f"{name}.yaml", sets)
            assert (r.eval.steps, r.run.checkpoint_every) == ([2, 4], 5), (name, sets)


def test_the_fingerprint_covers_the_method_only():
    base = _recipe()
    assert _recipe(**FLAT_RUN_EVAL).fingerprint() == base.fingerprint()  # every run and eval setting changed
    for method in ({"seed": 1}, {"lora_rank": 8}, {"lora_targets": "attn"}, {"grad_clip": 0.5}):
        assert _recipe(**method).fingerprint() != base.fingerprint(), method
    # as hypersd computed it before the sections: checkpoints of such runs still resume
    flat_before = from_dict({"stages": [TSCD], "seed": 3, "eval_steps": [1, 2], "checkpoint_every": 7})
    assert flat_before.fingerprint() == "e00dbe42736ef2e8"


def test_a_data_side_discriminator_is_part_of_the_method():
    paper = from_dict({"stages": [{**TSCD, "adv_real": "target"}]})
    assert paper.fingerprint() == _recipe().fingerprint()  # the default leaves earlier runs' fingerprints
    assert from_dict({"stages": [{**TSCD, "adv_real": "data"}]}).fingerprint() != paper.fingerprint()


def test_feedback_after_a_dmd_stage_that_moved_the_one_step_sampler_is_refused():
    fb = {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits"}], "sample_steps": [1, 2]}
    with pytest.raises(HypersdError, match="stage 'fb': a feedback stage after DMD at generator_t 800 would train "
                                           "the one-step sampler at 999"):
        _recipe({**DMD, "generator_t": 800}, fb)
    _recipe({**DMD, "generator_t": 800}, {**fb, "sample_steps": [2, 4]})  # no one-step sample to train
    _recipe(DMD, fb)  # DMD at T-1: feedback's one step is where the LoRA is sampled
    _recipe(fb, {"name": "m", "kind": "merge"}, {**DMD, "generator_t": 800})  # the packaged order


def test_the_regression_distance_is_checked_and_mse_keeps_the_fingerprint():
    plain = _recipe(DMD).fingerprint()
    assert _recipe({**DMD, "reg_distance": "mse"}).fingerprint() == plain
    assert _recipe({**DMD, "reg_distance": "l1"}).fingerprint() != plain
    with pytest.raises(HypersdError, match="stage 'd': reg_distance must be 'mse' or 'l1', got 'l2'"):
        _recipe({**DMD, "reg_distance": "l2"})


def test_the_resolved_recipe_shows_its_sections_and_loads_back(tmp_path, capsys):
    import yaml

    from hypersd.cli import main

    r = _recipe(**FLAT_RUN_EVAL)
    printed = yaml.safe_load(r.dump())
    assert printed["run"]["checkpoint_every"] == 7 and printed["eval"]["steps"] == [1, 2]
    assert not set(printed) & set(FLAT_RUN_EVAL)  # no flat copy beside the sections
    assert from_dict(printed) == r
    cfg = tmp_path / "flat.yaml"
    cfg.write_text(yaml.safe_dump({"stages": [TSCD], **FLAT_RUN_EVAL}))
    main(["distill", "--config", str(cfg), "--dry-run"])  # what is printed before a run
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["run"] == printed["run"] and shown["eval"] == printed["eval"]


def test_a_flux_dmd_stage_left_at_the_t1000_generator_t_is_refused_with_its_first_step():
    from hypersd.core import FlowSchedule
    from hypersd.core.noise import FLUX_T
    from hypersd.train.recipe import check_timesteps

    flux = FlowSchedule(shift=3.0, timestep_scale=1.0, spacing="trailing", T=FLUX_T)
    dmd = {"name": "d", "kind": "dmd", "t_range": [20, 1180], "reg_steps": 8}
    with pytest.raises(HypersdError, match=f"set generator_t: {FLUX_T - 1}"):
        check_timesteps(_flow_recipe({"name": "t", "segments": 8}, dmd, eval_steps=[1, 8]), "recipe", flux)
    check_timesteps(_flow_recipe({"name": "t", "segments": 8}, {**dmd, "generator_t": FLUX_T - 1}, eval_steps=[1, 8]),
                    "recipe", flux)
