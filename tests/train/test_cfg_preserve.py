"""cfg: preserve, a LoRA made to be sampled with classifier-free guidance (docs/METHOD.md)."""

import pytest
import torch

from hypersd import lora
from hypersd.errors import HypersdError
from hypersd.inference.plan import resolve
from hypersd.inference.recipes import lora_recipe
from hypersd.nets.roles import RUNNING
from hypersd.teachers.base import Cond
from hypersd.train.recipe import from_dict
from hypersd.train.stages import stage_run
from hypersd.train.trainer import Distiller


def _recipe(teacher_file, stages, **kw):
    raw = {"teacher": str(teacher_file), "lora_rank": 4, "grid_every_stage": False, "eval_steps": [1],
           "stage_defaults": {"batch": 4, "steps": 2}, "stages": stages, **kw}
    return from_dict(raw)


def _distiller(tmp_path, teacher_file, stages, **kw):
    return Distiller(_recipe(teacher_file, stages, **kw), tmp_path, progress=False)


def _record_calls(teacher):
    """(role name, batch rows) of every network call from now on."""
    calls, eps = [], teacher.eps

    def recording(x, t, cond):
        calls.append((teacher.unet.__dict__[RUNNING].name, len(x), cond.hidden.detach().clone()))
        return eps(x, t, cond)

    teacher.eps = recording
    return calls


def _is_uncond(hidden: torch.Tensor, uncond_row: Cond) -> torch.Tensor:
    return (hidden == uncond_row.hidden[0]).flatten(1).all(1)


@pytest.mark.parametrize("cfg", ["bake", "preserve"])
def test_preserve_takes_the_conditional_teacher_step_and_bake_the_guided_one(cfg, tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [{"name": "t", "segments": 2}], cfg=cfg, cfg_dropout=0.25)
    run = stage_run(d, d.recipe.stages[0])
    run.enter(fresh=True)
    calls = _record_calls(d.teacher)
    z, prompts = d.data.batch(16, d.generator)
    run.loss(z, prompts, d.teacher.encode_prompt(prompts))
    teacher = [(n, rows) for name, n, rows in calls if name == "teacher"]
    assert len(teacher) == 1
    rows, hidden = teacher[0]
    student = next(h for name, _, h in calls if name == "student")
    if cfg == "bake":  # one guided call: conditional and unconditional rows side by side
        assert rows == 32 and _is_uncond(hidden[16:], d.uncond_row).all() and torch.equal(hidden[:16], student)
    else:  # the conditional teacher alone, on the very rows the student sees (some dropped to the empty prompt)
        assert rows == 16 and torch.equal(hidden, student)


def test_preserve_changes_the_target_from_the_guided_one(tmp_path, random_teacher_file):
    """The same draws give another TSCD target under preserve than under bake: the option is not ignored."""
    targets = {}
    for cfg in ("bake", "preserve"):
        d = _distiller(tmp_path / cfg, random_teacher_file, [{"name": "t", "segments": 2}], cfg=cfg)
        run = stage_run(d, d.recipe.stages[0])
        run.enter(fresh=True)
        z, prompts = d.data.batch(8, torch.Generator().manual_seed(1))
        cond = d.teacher.encode_prompt(prompts)
        _, targets[cfg], _ = run.step(z, cond, cond.unconditional(d.uncond_row), torch.Generator().manual_seed(2))
        guided = run.step.cfg.guidance
        assert (guided is None) == (cfg == "preserve")
    assert (targets["bake"] - targets["preserve"]).abs().max() > 1e-3


def test_prompts_are_dropped_at_the_configured_rate_and_only_under_preserve(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [{"name": "t", "segments": 2}], cfg="preserve", cfg_dropout=0.3)
    run = stage_run(d, d.recipe.stages[0])
    cond = d.teacher.encode_prompt(["a handwritten digit seven"] * 4000)
    mixed = run.drop_prompts(cond).hidden
    dropped = _is_uncond(mixed, d.uncond_row)
    assert 0.27 < dropped.float().mean().item() < 0.33
    assert torch.equal(mixed[~dropped], cond.hidden[~dropped])  # the others are the prompt, untouched
    bake = _distiller(tmp_path / "bake", random_teacher_file, [{"name": "t", "segments": 2}], cfg_dropout=0.3)
    assert stage_run(bake, bake.recipe.stages[0]).drop_prompts(cond) is cond


def test_cond_where_keeps_each_rows_micro_conditioning():
    cond = Cond(torch.ones(3, 2, 4), {"text_embeds": torch.ones(3, 5), "time_ids": torch.arange(18.).view(3, 6)})
    empty = Cond(torch.zeros(3, 2, 4), {"text_embeds": torch.zeros(3, 5), "time_ids": torch.arange(18.).view(3, 6)})
    mixed = cond.where(torch.tensor([True, False, True]), empty)
    assert mixed.hidden[:, 0, 0].tolist() == [1, 0, 1] and mixed.added["text_embeds"][:, 0].tolist() == [1, 0, 1]
    assert torch.equal(mixed.added["time_ids"], cond.added["time_ids"])


def test_dmd_and_feedback_sample_the_student_with_cfg_under_preserve(tmp_path, random_teacher_file):
    stages = [{"name": "t", "segments": 1},
              {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits"}], "sample_steps": [1]},
              {"name": "m", "kind": "merge"},
              {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 4, "reg_steps": 2, "reg_batch": 2}]
    d = _distiller(tmp_path, random_teacher_file, stages, cfg="preserve", cfg_guidance=3.0)
    z, prompts = d.data.batch(4, d.generator)
    cond = d.teacher.encode_prompt(prompts)
    fb = stage_run(d, d.recipe.stages[1])
    fb.enter(fresh=True)
    calls = _record_calls(d.teacher)
    fb.loss(z, prompts, cond)
    assert [n for name, n, _ in calls if name == "feedback"] == [8]  # one step, conditional + unconditional rows
    lora.remove_lora(d.teacher.unet, lora.FEEDBACK)
    lora.activate(d.teacher.unet, lora.STUDENT, trainable=(lora.STUDENT,))
    dmd = stage_run(d, d.recipe.stages[3])
    assert dmd.w_real == 3.0  # the real score at the LoRA's guidance
    dmd.enter(fresh=True)
    calls.clear()
    dmd.loss(z, prompts, cond)
    student = [n for name, n, _ in calls if name == "student"]
    assert student == [2 * (4 + 2)]  # the generator's batch and the regulariser's, each guided
    assert [n for name, n, _ in calls if name == "teacher"] == [8]  # the real score, guided


def test_a_preserve_run_trains_and_records_its_guidance_for_generate(tmp_path, random_teacher_file):
    stages = [{"name": "t8", "segments": 2}, {"name": "t1", "segments": 1}]
    d = _distiller(tmp_path, random_teacher_file, stages, cfg="preserve", cfg_guidance=3.0)
    start = [p.detach().clone() for p in d.student]
    assert d.run()
    assert any(not torch.equal(a, p) for a, p in zip(start, d.student))  # it trained
    for path in (tmp_path / "stages" / "t8" / "lora.safetensors", d.finish()):
        _, meta = lora.read_lora(path)
        assert meta["cfg"] == "preserve" and meta["guidance"] == 3.0
        recipe, _ = lora_recipe(path)
        plan = resolve(recipe, model="m", backbone="digits", lora=str(path), T=1000, default_guidance=2.0, steps=4)
        assert (plan.guidance, plan.passes, plan.cfg) == (3.0, 2, "preserve")
        plan = resolve(recipe, model="m", backbone="digits", lora=str(path), T=1000, default_guidance=2.0, steps=4,
                       guidance=1.0)
        assert plan.passes == 1  # the command line still wins
    baked = _distiller(tmp_path / "bake", random_teacher_file, stages[:1])
    assert baked.lora_meta(baked.recipe.stages[0])["guidance"] == 1.0
    assert baked.lora_meta(baked.recipe.stages[0])["cfg"] == "bake"


def test_the_preserve_settings_are_checked_and_fingerprinted(random_teacher_file):
    stages = [{"name": "t", "segments": 2}]
    bake = _recipe(random_teacher_file, stages)
    assert _recipe(random_teacher_file, stages, cfg="bake", cfg_dropout=0.5).fingerprint() == bake.fingerprint()
    preserve = _recipe(random_teacher_file, stages, cfg="preserve")
    assert preserve.fingerprint() != bake.fingerprint()
    assert _recipe(random_teacher_file, stages, cfg="preserve", cfg_dropout=0.2).fingerprint() != preserve.fingerprint()
    for bad, match in [({"cfg": "keep"}, "cfg must be 'bake'"),
                       ({"cfg": "preserve", "cfg_dropout": 0.0}, "cfg_dropout must be in"),
                       ({"cfg": "preserve", "cfg_guidance": 1.0}, "no classifier-free guidance")]:
        with pytest.raises(HypersdError, match=match):
            _recipe(random_teacher_file, stages, **bad)


def test_flux_refuses_preserve_and_names_the_fix():
    raw = {"backbone": "flux", "teacher": "black-forest-labs/FLUX.1-dev", "cfg": "preserve",
           "stages": [{"name": "t", "segments": 8}]}
    with pytest.raises(HypersdError, match="FLUX.1 does not use .*use cfg: bake"):
        from_dict(raw)
    from_dict({**raw, "cfg": "bake"})


def test_preserve_needs_a_guidance_above_one(tmp_path, random_teacher_file):
    from hypersd.teachers.digits import DigitsTeacher

    teacher = DigitsTeacher.load(random_teacher_file)
    teacher.default_guidance = 1.0
    with pytest.raises(HypersdError, match="set cfg_guidance"):
        Distiller(_recipe(random_teacher_file, [{"name": "t", "segments": 2}], cfg="preserve"), tmp_path,
                  progress=False, teacher=teacher).stage_context()


def test_the_packaged_cfg_recipes_preserve_cfg():
    from hypersd.train.recipe import load_recipe

    sdxl, digits = load_recipe("sdxl-cfg"), load_recipe("digits-cfg")
    assert (sdxl.cfg, sdxl.cfg_guidance, sdxl.cfg_dropout, [s.segments for s in sdxl.stages]) == ("preserve", 5.0, 0.1, [8])
    assert (digits.cfg, digits.backbone) == ("preserve", "digits")
    assert load_recipe("sd15", ["cfg=preserve", "cfg_guidance=5"]).cfg == "preserve"  # the documented override
