import math

import pytest
import torch

from hypersd import lora
from hypersd.errors import HypersdError
from hypersd.losses.adversarial import hinge_d_loss
from hypersd.losses.dmd import score_x0
from hypersd.train.recipe import from_dict
from hypersd.train.stages import merged, stage_run
from hypersd.train.trainer import Distiller, train_step


def _distiller(tmp_path, teacher_file, stages):
    recipe = from_dict({"teacher": str(teacher_file), "lora_rank": 4, "grid_every_stage": False,
                        "stage_defaults": {"batch": 4, "steps": 2}, "stages": stages})
    return Distiller(recipe, tmp_path, progress=False)


def _grads(unet, name):
    return [p.grad for p in lora.adapter_params(unet, name)]


def test_dmd_loss_trains_only_the_student_and_keep_starts_at_zero(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "d", "kind": "dmd", "fake_warmup": 1, "reg_pool": 4, "reg_steps": 2, "reg_batch": 2,
         "keep_weight": 1.0, "keep_batch": 3}])
    with torch.no_grad():  # a student that differs from the teacher
        for p in lora.adapter_params(d.teacher.unet, lora.STUDENT):
            p.add_(0.05 * torch.randn(p.shape))
    run = stage_run(d, d.recipe.stages[1])
    run.enter(fresh=True)
    assert run.keep_t == [124, 249, 374, 499, 624, 749, 874]
    for p in d.teacher.unet.parameters():  # the warm-up's fake-score gradients
        p.grad = None
    z, prompts = d.data.batch(4, d.generator)
    loss, logs = run.loss(z, prompts, d.teacher.encode_prompt(prompts))
    assert logs["keep"].item() == 0.0  # the anchor is the student as the stage found it
    assert torch.isfinite(loss) and logs["dmd"].item() > 0 and logs["reg"].item() > 0
    loss.backward()
    unet = d.teacher.unet
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(unet, lora.STUDENT))
    assert all(g is None for g in _grads(unet, lora.FAKE) + _grads(unet, lora.EMA))
    before = [p.detach().clone() for p in lora.adapter_params(unet, lora.FAKE)]
    assert "fake" in run.after_step()  # fake-score updates move the fake adapter only
    assert any(not torch.equal(a, p) for a, p in zip(before, lora.adapter_params(unet, lora.FAKE)))
    assert all(p.requires_grad for p in lora.adapter_params(unet, lora.STUDENT))


def test_keep_holds_the_multi_step_samplers_dmd_trains_too(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 2, "reg_steps": 2, "keep_weight": 1.0,
         "generator_t": 800, "generator_steps": [1, 4]}])
    run = stage_run(d, d.recipe.stages[1])
    run.enter(fresh=True)
    # the 4-step sampler's timesteps too: an anchor DMD pulls against (without it the multi-step
    # samplers drift, docs/RESULTS.md); only the one-step generator's own timestep is free
    assert run.keep_t == [124, 249, 374, 499, 624, 749, 874, 999]


def test_the_regulariser_follows_the_ode_of_the_real_scores_guidance(tmp_path, random_teacher_file):
    def pool(**dmd):
        d = _distiller(tmp_path / str(len(dmd)) / str(dmd.get("guidance")), random_teacher_file, [
            {"name": "t", "segments": 1},
            {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 4, "reg_steps": 2, **dmd}])
        run = stage_run(d, d.recipe.stages[1])
        run.enter(fresh=True)
        return run.w_real, run.pool[2]

    w_default, default = pool()
    w, same = pool(guidance=w_default)
    assert w == w_default and torch.equal(same, default)
    w, other = pool(guidance=w_default + 2.0)
    assert w == w_default + 2.0 and not torch.allclose(other, default)


def test_feedback_trains_its_own_lora_on_a_frozen_student(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits", "alpha": 0.0}], "perceptual_weight": 1.0}])
    run = stage_run(d, d.recipe.stages[1])
    run.enter(fresh=True)
    unet = d.teacher.unet
    assert lora.active(unet) == [lora.STUDENT, lora.FEEDBACK]
    z, prompts = d.data.batch(4, d.generator)
    loss, logs = run.loss(z, prompts, d.teacher.encode_prompt(prompts))
    assert set(logs) == {"digits", "perc"} and logs["digits"].item() < 0  # a log-probability
    loss.backward()
    assert all(g is None for g in _grads(unet, lora.STUDENT))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(unet, lora.FEEDBACK))


def test_merge_with_a_rank_leaves_the_compressed_merge_in_student_and_anchor(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits"}]},
        {"name": "m", "kind": "merge", "ratio": 0.5, "rank": 4}])
    unet = d.teacher.unet
    stage_run(d, d.recipe.stages[1]).enter(fresh=True)
    with torch.no_grad():  # a student and a feedback LoRA with something to merge
        for p in lora.adapter_params(unet, lora.STUDENT) + lora.adapter_params(unet, lora.FEEDBACK):
            p.add_(0.05 * torch.randn(p.shape))
    stacked, stacked_spec = merged(unet, 0.5)
    assert stacked_spec["rank"] == 8
    want, want_spec = lora.compress_state(stacked, stacked_spec, 4)
    stage_run(d, d.recipe.stages[2]).finish(tmp_path / "m")
    assert lora.FEEDBACK not in unet.peft_config and lora.active(unet) == [lora.STUDENT]
    for name in (lora.STUDENT, lora.EMA):
        assert lora.spec(unet, name) == want_spec
        got = lora.get_state(unet, name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    state, meta = lora.read_lora(tmp_path / "m" / "lora.safetensors")
    assert meta["rank"] == 4 and all(torch.equal(state[k], want[k]) for k in want)


@pytest.mark.parametrize("rank", [0, 2.5])
def test_merge_rank_must_be_a_positive_whole_number(random_teacher_file, rank):
    with pytest.raises(HypersdError, match="rank must be a whole number"):
        from_dict({"teacher": str(random_teacher_file), "stages": [
            {"name": "t"}, {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits"}]},
            {"name": "m", "kind": "merge", "rank": rank}]})


def test_a_merge_rank_changes_the_fingerprint_so_no_checkpoint_resumes_across_it():
    stages = [{"name": "t"}, {"name": "fb", "kind": "feedback", "rewards": [{"name": "digits"}]},
              {"name": "m", "kind": "merge"}]
    exact = from_dict({"stages": stages}).fingerprint()
    assert exact == from_dict({"stages": [*stages[:2], {"name": "m", "kind": "merge", "rank": None}]}).fingerprint()
    assert exact != from_dict({"stages": [*stages[:2], {"name": "m", "kind": "merge", "rank": 32}]}).fingerprint()


def test_dmd_generator_ema_follows_the_student_and_is_what_the_stage_hands_on(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 4, "reg_steps": 2, "reg_batch": 2,
         "generator_ema": 0.75}])
    unet = d.teacher.unet
    run = stage_run(d, d.recipe.stages[1])
    run.enter(fresh=True)
    start = [p.detach().clone() for p in run.params]
    assert all(torch.equal(a, p) for a, p in zip(run.average, start))  # the average starts at the generator
    assert lora.active(unet) == [lora.STUDENT]
    opt = torch.optim.AdamW(run.params, lr=1e-2)
    z, prompts, cond = d.batch(4)
    run.loss(z, prompts, cond)[0].backward()
    opt.step()
    run.after_step()
    moved = [p.detach().clone() for p in run.params]
    assert any(not torch.equal(a, b) for a, b in zip(start, moved))
    for avg, a, b in zip(run.average, start, moved):  # one EMA step: 0.75 of the old, 0.25 of the new
        assert torch.allclose(avg, 0.75 * a + 0.25 * b, atol=1e-7)
    want = [a.detach().clone() for a in run.average]
    run.finish(tmp_path / "d")
    assert lora.AVERAGE not in unet.peft_config and lora.active(unet) == [lora.STUDENT]
    assert all(torch.equal(p, w) for p, w in zip(lora.adapter_params(unet, lora.STUDENT), want))
    saved, _ = lora.read_lora(tmp_path / "d" / "lora.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in lora.get_state(unet, lora.STUDENT).items())


def test_generator_ema_must_be_a_decay():
    with pytest.raises(HypersdError, match="generator_ema must be in"):
        from_dict({"stages": [{"name": "t"}, {"name": "d", "kind": "dmd", "generator_ema": 1.0}]})


def test_a_feedback_lora_of_another_rank_merges_exactly(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "fb", "kind": "feedback", "rank": 2, "rewards": [{"name": "digits"}]},
        {"name": "m", "kind": "merge"}])
    unet = d.teacher.unet
    stage_run(d, d.recipe.stages[1]).enter(fresh=True)
    assert lora.spec(unet, lora.FEEDBACK)["rank"] == 2 and lora.spec(unet, lora.STUDENT)["rank"] == 4
    with torch.no_grad():
        for p in lora.adapter_params(unet, lora.STUDENT) + lora.adapter_params(unet, lora.FEEDBACK):
            p.add_(0.05 * torch.randn(p.shape))
    z, prompts = d.data.batch(4, d.generator)
    cond = d.teacher.encode_prompt(prompts)
    with torch.no_grad():
        both = d.teacher.eps(z, 500, cond)  # student and feedback active together
        stage_run(d, d.recipe.stages[2]).finish(tmp_path / "m")
        assert lora.spec(unet, lora.STUDENT)["rank"] == 6 and lora.active(unet) == [lora.STUDENT]
        assert torch.allclose(d.teacher.eps(z, 500, cond), both, atol=1e-5)


def _tscd_step(tmp_path, teacher_file, **stage):
    """A TSCD stage after one training step; the student and its target before the step."""
    d = _distiller(tmp_path, teacher_file, [{"name": "t", "segments": 2, **stage}])
    run = stage_run(d, d.recipe.stages[0])
    run.enter(fresh=True)
    with torch.no_grad():  # a target that differs from the student, as it does after the first step
        for p in run.ema:
            p.add_(0.05 * torch.randn(p.shape))
    student, ema = [p.detach().clone() for p in run.params], [p.detach().clone() for p in run.ema]
    z, prompts, cond = d.batch(4)
    logs = train_step(d.rt, run, torch.optim.AdamW(run.params, lr=1e-2), z, prompts, cond, None)
    return run, logs, student, ema


def test_tscd_target_moves_toward_the_student_by_one_minus_the_decay(tmp_path, random_teacher_file):
    run, _, student, ema = _tscd_step(tmp_path, random_teacher_file, ema_decay=0.9)
    moved = [p.detach() for p in run.params]
    assert any(not torch.equal(a, b) for a, b in zip(student, moved))
    for new, old, s in zip(run.ema, ema, moved):  # the lerp toward the student after its update
        assert torch.allclose(new, old + 0.1 * (s - old), atol=1e-7)
    assert sum((new - old).abs().sum() for new, old in zip(run.ema, ema)) > 0


def test_tscd_logs_its_distance_by_name(tmp_path, random_teacher_file):
    _, logs, _, _ = _tscd_step(tmp_path, random_teacher_file, distance="l1")
    assert set(logs) >= {"l1"} and "mse" not in logs and logs["l1"].item() > 0


def test_tscd_discriminator_step_lowers_its_loss_on_the_batch(tmp_path, random_teacher_file):
    run, logs, _, _ = _tscd_step(tmp_path, random_teacher_file, adv_weight=0.5, d_lr=1e-3, d_hidden=8)
    assert {"mse", "g", "d"} <= set(logs)
    pred, tgt, t_end, cond = run._for_d  # what the step trained the heads on
    with torch.no_grad():
        after = hinge_d_loss(run.disc(tgt, t_end, cond), run.disc(pred, t_end, cond))
    assert after < logs["d"] - 1e-3
    assert run.d_opt.state_dict()["state"]  # the heads' optimizer has stepped


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_dmd_real_score_is_the_guided_teacher(tmp_path, random_teacher_file, monkeypatch, guidance):
    import hypersd.train.stages

    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 2, "reg_steps": 1, "reg_batch": 1,
         "guidance": guidance}])
    t, unet = d.teacher, d.teacher.unet
    with torch.no_grad():  # a student unlike the teacher, so that a real score with adapters on shows
        for p in lora.adapter_params(unet, lora.STUDENT):
            p.add_(0.05 * torch.randn(p.shape))
    run = stage_run(d, d.recipe.stages[1])
    run.enter(fresh=True)
    w = guidance or t.default_guidance
    assert run.w_real == w != 1
    real = []

    def spy(eps_fn, x, noise, tt, acp):
        out = score_x0(eps_fn, x, noise, tt, acp)
        if lora._tuner_layers(unet)[0].disable_adapters:  # the real score: the teacher's pass
            real.append((out, x, noise, tt))
        return out

    monkeypatch.setattr(hypersd.train.stages, "score_x0", spy)
    z, prompts, cond = d.batch(3)
    run.loss(z, prompts, cond)
    (out, x, noise, tt), = real
    uncond = cond.unconditional(d.uncond_row)
    with torch.no_grad(), lora.adapters_disabled(unet):
        def guided(w):
            return score_x0(lambda xt, s: t.eps(xt, s, uncond) + w * (t.eps(xt, s, cond) - t.eps(xt, s, uncond)),
                            x, noise, tt, run.schedule)
        want, unguided = guided(w), guided(1.0)
    assert torch.allclose(out, want, atol=1e-5)
    assert (want - unguided).abs().max() > 1e-2  # the check tells a guided score from an unguided one


def test_tscd_adv_real_data_shows_the_discriminator_the_batch_noised_to_t_end(tmp_path, random_teacher_file,
                                                                             monkeypatch):
    import hypersd.losses.adversarial

    d = _distiller(tmp_path, random_teacher_file, [{"name": "t", "segments": 2, "adv_weight": 0.5,
                                                    "adv_real": "data", "d_hidden": 8}])
    run = stage_run(d, d.recipe.stages[0])
    run.enter(fresh=True)
    seen, noised, features, add_noise = [], [], hypersd.losses.adversarial.encoder_features, run.schedule.add_noise

    def disc_spy(net, inputs):  # what each discriminator call reads
        seen.append(inputs["sample"].detach().clone())
        return features(net, inputs)

    def spy(x0, noise, t):
        noised.append((x0, noise, t))
        return add_noise(x0, noise, t)

    monkeypatch.setattr(hypersd.losses.adversarial, "encoder_features", disc_spy)
    monkeypatch.setattr(run.schedule, "add_noise", spy)
    z, prompts, cond = d.batch(4)
    train_step(d.rt, run, torch.optim.AdamW(run.params, lr=1e-2), z, prompts, cond, None)
    x0, noise, t_end = noised[-1]
    assert x0 is z and torch.equal(t_end, run._for_d[2])
    pred, real, _, _ = run._for_d
    assert len(seen) == 3 and torch.equal(seen[1], real) and torch.equal(seen[2], pred)  # g, then D's real, fake
    a = run.schedule.alpha(t_end).view(-1, 1, 1, 1)
    s = run.schedule.sigma(t_end).view(-1, 1, 1, 1)
    assert torch.allclose(real, a * z + s * noise, atol=1e-6)
    assert 0.8 < noise.std() < 1.2 and not torch.allclose(real, z)  # fresh noise, not the clean batch


@pytest.mark.parametrize("adv_real", ["target", "data"])
def test_tscd_discriminator_separates_data_from_jumps_in_a_few_steps(tmp_path, random_teacher_file, adv_real):
    d = _distiller(tmp_path, random_teacher_file, [{"name": "t", "segments": 1, "adv_weight": 0.1,
                                                    "adv_real": adv_real, "d_lr": 0.1, "d_hidden": 8}])
    run = stage_run(d, d.recipe.stages[0])
    run.enter(fresh=True)
    opt = torch.optim.AdamW(run.params, lr=1e-4)
    d_losses = [float(train_step(d.rt, run, opt, *d.batch(8), None)["d"].detach()) for _ in range(8)]
    # the jump and its target agree, D(real) ≈ D(fake): the hinge stays at 2; data vs jumps separates
    assert (min(d_losses[-3:]) < 1.95) == (adv_real == "data")


def test_adv_real_must_be_target_or_data():
    with pytest.raises(HypersdError, match="adv_real must be 'target' or 'data'"):
        from_dict({"stages": [{"name": "t", "adv_weight": 0.1, "adv_real": "real"}]})


@pytest.mark.parametrize("generator_steps", [[1], [1, 2, 4, 8]])
def test_dmd_generator_steps_choose_where_the_generator_is_trained(tmp_path, random_teacher_file, monkeypatch,
                                                                   generator_steps):
    """[1]: every generator step at generator_t from the noise, in one call with the regulariser's
    batch (the stage as before the option); [1, 2, 4, 8]: also at the other samplers' timesteps."""
    import hypersd.train.stages

    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1},
        {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 4, "reg_steps": 2, "reg_batch": 2,
         "generator_t": 800, "generator_steps": generator_steps, "generator_eta": 0.5}])
    run = stage_run(d, d.recipe.stages[1])
    run.enter(fresh=True)
    calls = []

    def spy(eps_fn, x, t, schedule):
        out = hypersd.losses.dmd.generate(eps_fn, x, t, schedule)
        calls.append((t, len(x), out))
        return out

    monkeypatch.setattr(hypersd.train.stages, "generate", spy)
    trained = set()
    for _ in range(12):
        calls.clear()
        z, prompts, cond = d.batch(4)
        run.loss(z, prompts, cond)
        t_gen, n, x = calls[0]  # the DMD batch's step, the one with the gradient
        assert x.requires_grad and torch.equal(run._last[0], x[:4].detach())  # what the fake score learns
        trained.add(t_gen)
        if t_gen == 800:
            assert n == 4 + 2 and len(calls) == 1
        else:  # the regulariser still holds the one-step generator
            assert [(t, n) for t, n, _ in calls[1:]] == [(800, 2)]
    if generator_steps == [1]:
        assert trained == {800}
    else:
        assert trained - {800} and trained <= {800, 999, 874, 749, 624, 499, 374, 249, 124}


@pytest.mark.parametrize("dmd, trained", [({}, None), ({"generator_steps": [1, 4, 2, 4]}, None),
                                           ({"generator_steps": [1, 4, 2, 4], "generator_eta": 0.5},
                                            {"2": 0.5, "4": 0.5})])
def test_the_lora_records_the_eta_multi_step_dmd_trained_at(tmp_path, random_teacher_file, dmd, trained):
    d = _distiller(tmp_path, random_teacher_file, [
        {"name": "t", "segments": 1}, {"name": "d", "kind": "dmd", "generator_t": 800, **dmd}])
    assert "trained_eta" not in d.lora_meta(d.recipe.stages[0])  # before DMD: nothing trained at an eta
    assert d.lora_meta(d.recipe.stages[1]).get("trained_eta") == trained


def test_dmd_generator_steps_are_checked_and_one_step_keeps_the_fingerprint():
    stages = [{"name": "t"}, {"name": "d", "kind": "dmd"}]
    plain = from_dict({"stages": stages}).fingerprint()
    assert plain == from_dict({"stages": [stages[0], {**stages[1], "generator_steps": [1]}]}).fingerprint()
    assert plain != from_dict({"stages": [stages[0], {**stages[1], "generator_steps": [1, 4]}]}).fingerprint()
    for bad, match in (([], "generator_steps must list"), ([0], "generator_steps must list"),
                       ([3], "generator_steps")):
        with pytest.raises(HypersdError, match=match):
            from_dict({"stages": [stages[0], {**stages[1], "generator_steps": bad}]})
    with pytest.raises(HypersdError, match="generator_eta must be in"):
        from_dict({"stages": [stages[0], {**stages[1], "generator_steps": [1, 2], "generator_eta": 2.0}]})


GAN_DMD = {"name": "d", "kind": "dmd", "fake_warmup": 0, "fake_updates": 2, "reg_pool": 4, "reg_steps": 2,
           "reg_batch": 2, "generator_t": 800, "gan_hidden": 8}


def _gan_run(tmp_path, teacher_file, **kw):
    d = _distiller(tmp_path, teacher_file, [{"name": "t", "segments": 1}, {**GAN_DMD, **kw}])
    run = stage_run(d, d.recipe.stages[1])
    run.enter(fresh=True)
    return d, run


def test_dmd_gan_term_trains_the_student_through_the_fake_scores_features_only(tmp_path, random_teacher_file):
    d, run = _gan_run(tmp_path, random_teacher_file, gan_weight=1.0)
    unet = d.teacher.unet
    with torch.no_grad():  # a fake score unlike the teacher, so that its features are the fake adapter's
        for p in run.fake_params:
            p.add_(0.05 * torch.randn(p.shape))
    z, prompts, cond = d.batch(4)
    _, logs = run.loss(z, prompts, cond)
    assert torch.isfinite(logs["gan"]) and logs["gan"].requires_grad
    logs["gan"].backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(unet, lora.STUDENT))
    assert all(g is None for g in _grads(unet, lora.FAKE))  # the generator's step moves neither the fake LoRA
    assert all(p.grad is None and p.requires_grad for p in run.heads.parameters())  # nor the heads
    assert lora.active(unet) == [lora.STUDENT] and all(p.requires_grad for p in run.params)


@pytest.mark.parametrize("train_fake", [True, False])
def test_dmd_classifier_update_moves_the_heads_and_with_gan_train_fake_the_fake_lora(tmp_path, random_teacher_file,
                                                                                     train_fake):
    d, run = _gan_run(tmp_path, random_teacher_file, gan_weight=0.01, gan_train_fake=train_fake)
    z, prompts, cond = d.batch(4)
    run.loss(z, prompts, cond)
    x = run._last[0]
    with run.roles.fake.running():
        run._classifier_loss(z, x, cond).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.heads.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(d.teacher.unet, lora.FAKE)) == train_fake
    heads = [p.detach().clone() for p in run.heads.parameters()]
    logs = run.after_step()
    assert torch.isfinite(logs["gan_d"]) and torch.isfinite(logs["fake"])
    assert all(not torch.equal(a, p) for a, p in zip(heads, run.heads.parameters()))
    assert len(run.fake_opt.param_groups) == 2 and "gan_heads" in run.pieces()


def test_dmd_without_the_gan_term_draws_what_it_drew_before_and_builds_no_heads(tmp_path, random_teacher_file):
    """The GAN term's draws come after every other: the same step with it off and on computes the
    same DMD and regulariser losses, and off it takes nothing more from the stream."""
    seen = {}
    for weight in (0.0, 0.5):
        d, run = _gan_run(tmp_path / str(weight), random_teacher_file, gan_weight=weight)
        z, prompts, cond = d.batch(4)
        _, logs = run.loss(z, prompts, cond)
        seen[weight] = logs, d.generator.get_state(), run
    (off, off_state, off_run), (on, on_state, _) = seen[0.0], seen[0.5]
    assert torch.equal(off["dmd"], on["dmd"]) and torch.equal(off["reg"], on["reg"])
    assert "gan" not in off and not torch.equal(off_state, on_state)
    assert off_run.heads is None and set(off_run.pieces()) == {"fake_opt"} and len(off_run.fake_opt.param_groups) == 1
    assert "gan_d" not in off_run.after_step()


def test_dmd_red_term_joins_the_real_scores_call_and_leaves_the_dmd_rows_as_they_were(tmp_path, random_teacher_file):
    """Its rows are extra rows of the real score's call: the DMD and regulariser losses stay what
    they are without it; off, it logs nothing and draws nothing more."""
    seen = {}
    for weight in (0.0, 1.0):
        d, run = _gan_run(tmp_path / str(weight), random_teacher_file, red_weight=weight, red_t_range=[5, 15])
        z, prompts, cond = d.batch(4)
        calls = []
        teacher_fn = run.roles.teacher.fn
        run.roles.teacher.fn = lambda *a, **k: (calls.append(len(a[0])), teacher_fn(*a, **k))[1]
        loss, logs = run.loss(z, prompts, cond)
        seen[weight] = logs, calls, loss, d, run, d.generator.get_state()
    (off, off_calls, *_, off_state), (on, on_calls, loss, d, run, on_state) = seen[0.0], seen[1.0]
    assert not torch.equal(off_state, on_state)  # on, its own t and noise are drawn after DMD's
    assert off_calls == [4] and on_calls == [8]  # one teacher call, its batch doubled
    assert torch.allclose(off["dmd"], on["dmd"], atol=1e-6) and torch.allclose(off["reg"], on["reg"], atol=1e-6)
    assert "red" not in off and torch.isfinite(on["red"]) and on["red"] > 0
    loss.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(d.teacher.unet, lora.STUDENT))
    assert all(g is None for g in _grads(d.teacher.unet, lora.FAKE))


def test_dmd_red_settings_are_checked_and_off_keep_the_fingerprint(tmp_path, random_teacher_file):
    stages = [{"name": "t"}, {"name": "d", "kind": "dmd"}]
    plain = from_dict({"stages": stages}).fingerprint()
    assert plain == from_dict({"stages": [stages[0], {**stages[1], "red_weight": 0.0, "red_t_range": [1, 2]}]}).fingerprint()
    assert plain != from_dict({"stages": [stages[0], {**stages[1], "red_weight": 0.5}]}).fingerprint()
    for bad, match in (({"red_weight": -1.0}, "red_weight must be >= 0"),
                       ({"red_weight": 0.5, "red_t_range": [50, 10]}, "red_t_range must be")):
        with pytest.raises(HypersdError, match=match):
            from_dict({"stages": [stages[0], {**stages[1], **bad}]})
    with pytest.raises(HypersdError, match="red_t_range .* is outside the timesteps"):
        _distiller(tmp_path, random_teacher_file, [{"name": "t"}, {**GAN_DMD, "red_weight": 0.1,
                                                                    "red_t_range": [10, 5000]}])


def test_dmd_gan_settings_are_checked_and_off_keep_the_fingerprint():
    stages = [{"name": "t"}, {"name": "d", "kind": "dmd"}]
    plain = from_dict({"stages": stages}).fingerprint()
    off = {"gan_weight": 0.0, "gan_d_weight": 0.5, "gan_hidden": 3, "gan_t_range": [0, 10], "gan_train_fake": False}
    assert plain == from_dict({"stages": [stages[0], {**stages[1], **off}]}).fingerprint()
    assert plain != from_dict({"stages": [stages[0], {**stages[1], "gan_weight": 3e-3}]}).fingerprint()
    for bad, match in (({"gan_weight": -1.0}, "gan_weight must be >= 0"),
                       ({"gan_weight": 0.1, "gan_d_weight": 0.0}, "gan_d_weight must be > 0"),
                       ({"gan_weight": 0.1, "gan_hidden": 0}, "gan_hidden must be >= 1"),
                       ({"gan_weight": 0.1, "gan_t_range": [900, 100]}, "gan_t_range must be"),
                       ({"gan_weight": 0.1, "gan_train_fake": 1}, "gan_train_fake")):
        with pytest.raises(HypersdError, match=match):
            from_dict({"stages": [stages[0], {**stages[1], **bad}]})


def test_dmd_gan_t_range_must_lie_in_the_teachers_timesteps(tmp_path, random_teacher_file):
    with pytest.raises(HypersdError, match="gan_t_range .* is outside the timesteps"):
        _distiller(tmp_path, random_teacher_file, [{"name": "t"}, {**GAN_DMD, "gan_weight": 0.1,
                                                                   "gan_t_range": [0, 5000]}])


def test_dmd_classifier_learns_to_tell_the_data_from_the_generators_samples(tmp_path, random_teacher_file):
    """At D = 0 the classifier's loss is log 4; the fake updates after a few generator steps take it
    below (at low noise, where the random teacher's samples and the data differ most)."""
    d, run = _gan_run(tmp_path, random_teacher_file, gan_weight=0.01, fake_lr=3e-2, fake_updates=4,
                      gan_t_range=[0, 100], gan_train_fake=False)
    z, prompts, cond = d.batch(8)
    run.loss(z, prompts, cond)
    d_losses = [float(run.after_step()["gan_d"]) for _ in range(5)]
    assert abs(d_losses[0] - math.log(4)) < 0.1 and d_losses[-1] < math.log(4) - 0.1, d_losses


def test_solve_below_is_checked_and_off_keeps_the_fingerprint():
    plain = from_dict({"stages": [{"name": "t"}]}).fingerprint()
    assert from_dict({"stages": [{"name": "t", "solve_below": -1}]}).fingerprint() == plain
    assert from_dict({"stages": [{"name": "t", "solve_below": 249}]}).fingerprint() != plain
    with pytest.raises(HypersdError, match="solve_below must be a timestep"):
        from_dict({"stages": [{"name": "t", "solve_below": -2}]})
    assert from_dict({"stages": [{"name": "t", "solve_stride": 1}]}).fingerprint() == plain
    assert from_dict({"stages": [{"name": "t", "solve_below": 249, "solve_stride": 3}]}).fingerprint() != \
        from_dict({"stages": [{"name": "t", "solve_below": 249}]}).fingerprint()
    with pytest.raises(HypersdError, match="solve_stride must be an integer >= 1"):
        from_dict({"stages": [{"name": "t", "solve_stride": 0}]})


def test_a_tscd_stage_hands_solve_below_to_its_step(tmp_path, random_teacher_file):
    d = _distiller(tmp_path, random_teacher_file, [{"name": "t", "segments": 1, "solve_below": 249,
                                                    "solve_stride": 3}])
    cfg = stage_run(d, d.recipe.stages[0]).step.cfg
    assert (cfg.solve_below, cfg.solve_stride) == (249, 3)
