"""A quantized frozen base (quantize_base): peft's quantization-aware LoRA layers on it, the LoRA's
effect kept (never folded into quantized weights, the fault of diffusers #10392), gradient
checkpointing through it, and LoRA files that carry over between the quantized and the plain base."""

import importlib.util

import pytest
import torch
from flow_tiny import T5_LENGTH, tiny_flux_pipeline, tiny_sd3_pipeline

from hypersd import lora
from hypersd.errors import HypersdError
from hypersd.nets import fp8, quant, speed
from hypersd.teachers.digits import DigitsTeacher
from hypersd.teachers.flux import FluxTeacher
from hypersd.teachers.sd import place
from hypersd.teachers.sd3 import SD3Teacher
from hypersd.train.context import StageContext
from hypersd.train.recipe import TSCDStage, from_dict
from hypersd.train.runtime import Runtime
from hypersd.train.stages import TSCDRun
from hypersd.train.trainer import Distiller, train_step

pytest.importorskip("torchao")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
KINDS = ["int8", "fp8", pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes"))]
LORA_LAYER = {"int8": "TorchaoLoraLinear", "fp8": "TorchaoLoraLinear", "nf4": "Linear4bit"}


def make_teacher(kind="flux", quantize="none"):
    pipe = tiny_sd3_pipeline(0) if kind == "sd3" else tiny_flux_pipeline(0)
    parts = {k: v for k, v in pipe.components.items() if v is not None}
    sched = dict(parts.pop("scheduler").config)
    place(parts, "cpu", None)
    if kind == "sd3":
        t = SD3Teacher(**parts, scheduler_config=sched, max_sequence_length=T5_LENGTH)
    else:
        t = FluxTeacher(**parts, scheduler_config=sched, resolution=16, max_sequence_length=T5_LENGTH)
    quant.quantize_teacher(t, quantize, "cpu")
    return t


def _inputs(t, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *t.latent_shape), generator=g)
    with torch.no_grad():
        cond = t.encode_prompt(["a red square", "two circles"][:n])
    return x, torch.tensor([700, 200][:n]), cond


def _student(t, rank=4):
    lora.add_lora(t.unet, lora.lora_config(rank, None, "transformer"), lora.STUDENT)
    lora.activate(t.unet, lora.STUDENT, trainable=(lora.STUDENT,))


def lora_grads(t, loss_fn) -> list:
    """The student LoRA's gradients of ``loss_fn()``, from zero."""
    params = lora.adapter_params(t.unet, lora.STUDENT)
    for p in params:
        p.grad = None
    loss_fn().backward()
    return [p.grad.clone() for p in params]


def _randomize_lora(t, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_params(t.unet, lora.STUDENT):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@torch.no_grad()
def _delta(t, x, s, cond):
    """What the active LoRA adds to the network's output (student minus the same base, adapters off)."""
    with lora.adapters_disabled(t.unet):
        base = t.eps(x, s, cond)
    return t.eps(x, s, cond) - base


def _cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("kind", KINDS)
def test_peft_wraps_the_quantized_base_with_its_own_lora_layers_and_the_lora_acts(kind):
    t = make_teacher("flux", kind)
    x, s, cond = _inputs(t)
    _student(t)
    bases = [m for n, m in t.unet.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    assert bases and all(quant.is_quantized_weight(m.weight) for m in bases)
    wrapped = {type(m).__name__ for m in t.unet.modules() if type(m).__module__.startswith("peft.tuners.lora")}
    assert wrapped == {LORA_LAYER[kind]}
    quant.check_wrapped(t.unet)
    assert all(p.dtype == torch.float32 and not quant.is_quantized_weight(p)
               for p in lora.adapter_params(t.unet, lora.STUDENT))
    _randomize_lora(t)
    delta = _delta(t, x, s, cond)
    assert delta.norm() > 1e-3 * t.eps(x, s, cond).norm()  # not a no-op
    # the sampling path (lora.fused) leaves the LoRA unmerged on a quantized base: exactly its effect
    with torch.no_grad():
        unfused = t.eps(x, s, cond)
        with lora.fused(t.unet):
            fused = t.eps(x, s, cond)
    assert torch.equal(fused, unfused)


def test_a_plain_lora_layer_around_a_quantized_weight_is_refused():
    from peft.tuners.lora.layer import Linear as PlainLoraLinear

    t = make_teacher("flux", "int8")
    _student(t)
    layer = next(m for m in t.unet.modules() if type(m).__name__ == "TorchaoLoraLinear")
    layer.__class__ = PlainLoraLinear  # what peft makes of a quantized layer it does not know (quanto's)
    with pytest.raises(HypersdError, match="plain one"):
        quant.check_wrapped(t.unet)


def test_quantizing_after_the_lora_is_attached_is_refused():
    t = make_teacher("flux")
    _student(t)
    with pytest.raises(HypersdError, match="before a LoRA"):
        quant.quantize(t.unet, "int8")


def _train(t, steps=3, lr=2e-2):
    """A few TSCD steps of the student LoRA (the trainer's own step), on random latents."""
    _student(t)
    # SD3's inclusive grid on T = 841 takes 43 points, FLUX's trailing one on T = 1000 takes 40
    stage = TSCDStage(name="t", segments=2, batch=2, lr=lr, steps=steps, solver_steps=43 if t.T == 841 else 40)
    g = torch.Generator().manual_seed(0)

    def batch(n, gen=None):
        prompts = ["a red square", "two circles"][:n]
        with torch.no_grad():
            return torch.randn((n, *t.latent_shape), generator=gen or g), prompts, t.encode_prompt(prompts)

    ctx = StageContext(t, torch.Generator().manual_seed(0), t.encode_prompt([""]), Runtime(), batch=batch,
                       stages=[stage], lora_rank=4, grad_clip=1.0)
    run = TSCDRun(ctx, stage)
    run.enter(fresh=True)
    opt = speed.optimizer(run.params, lr)
    for _ in range(steps):
        z, prompts, cond = batch(2)
        assert train_step(ctx.rt, run, opt, z, prompts, cond, grad_clip=1.0) is not None
    lora.activate(t.unet, lora.STUDENT)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_a_lora_trained_on_the_quantized_base_works_on_the_plain_one_and_the_reverse(model, kind, tmp_path):
    x, s, cond = _inputs(make_teacher(model))
    # trained on the quantized base, loaded on the plain one
    q = make_teacher(model, kind)
    _train(q)
    lora.save_lora(tmp_path / "q.safetensors", q.unet, {})
    on_q = _delta(q, x, s, cond)
    plain = make_teacher(model)
    lora.load_lora(plain.unet, tmp_path / "q.safetensors")
    assert not quant.is_quantized(plain.unet)
    on_plain = _delta(plain, x, s, cond)
    assert on_q.norm() > 1e-3 * x.norm()  # the training moved the output
    assert _cos(on_plain, on_q) > 0.95 and 0.9 < (on_plain.norm() / on_q.norm()).item() < 1.1
    # trained on the plain base, loaded on a quantized one: not a no-op, the same direction
    p = make_teacher(model)
    _train(p)
    lora.save_lora(tmp_path / "p.safetensors", p.unet, {})
    want = _delta(p, x, s, cond)
    q2 = make_teacher(model, kind)
    lora.load_lora(q2.unet, tmp_path / "p.safetensors")
    quant.check_wrapped(q2.unet)
    got = _delta(q2, x, s, cond)
    assert _cos(got, want) > 0.95 and 0.9 < (got.norm() / want.norm()).item() < 1.1


def test_gradient_checkpointing_on_a_quantized_base_gives_the_same_lora_gradients():
    t = make_teacher("flux", "int8")
    x, s, cond = _inputs(t)
    _student(t)
    _randomize_lora(t)
    loss = lambda: t.eps(x, s, cond).pow(2).mean()  # noqa: E731

    plain = lora_grads(t, loss)
    speed.gradient_checkpointing(t.unet)
    assert t.unet.is_gradient_checkpointing
    checkpointed = lora_grads(t, loss)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(plain, checkpointed))
    assert sum(g.abs().sum() for g in plain) > 0


def test_fp8_teacher_copies_skip_weights_already_quantized():
    t = make_teacher("flux", "int8")
    assert fp8.enable(t.unet) == 0  # no 16-bit values to copy: nothing changed
    fp8.disable(t.unet)


def _recipe(**run):
    return from_dict({"backbone": "digits", "lora_rank": 4, "grid_every_stage": False, "eval_steps": [1],
                      "stage_defaults": {"batch": 2, "steps": 2}, "stages": [{"name": "a", "segments": 2}],
                      "run": run})


def test_quantize_base_is_a_run_key_and_contradictions_are_refused():
    assert _recipe(quantize_base="int8").fingerprint() == _recipe().fingerprint()
    with pytest.raises(HypersdError, match="quantize_base 'int4' is not one of none, int8, fp8, nf4"):
        _recipe(quantize_base="int4")
    with pytest.raises(HypersdError, match="fp8_teacher and quantize_base"):
        _recipe(quantize_base="int8", fp8_teacher=True)
    with pytest.raises(HypersdError, match="quantize_text_encoders"):
        _recipe(quantize_text_encoders=True)


def test_a_missing_quantization_package_names_its_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(HypersdError, match="pip install bitsandbytes"):
        quant.quantize(torch.nn.Linear(4, 4).requires_grad_(False), "nf4")


def test_distill_quantizes_the_base_before_the_lora(tmp_path, random_teacher_file):
    recipe = _recipe(quantize_base="int8")
    recipe.teacher = str(random_teacher_file)
    d = Distiller(recipe, tmp_path, progress=False)
    unet = d.teacher.unet
    assert quant.is_quantized(unet)
    assert any(type(m).__name__ == "TorchaoLoraLinear" for m in unet.modules())
    assert d.run()
    assert all(p.dtype == torch.float32 for p in d.student) and any(p.abs().sum() > 0 for p in d.student)
    # the stage's LoRA file loads on the plain teacher
    path = tmp_path / "stages" / "a" / "lora.safetensors"
    state, meta = lora.read_lora(path)
    plain = DigitsTeacher.load(random_teacher_file)
    lora.load_lora(plain.unet, path)
    assert not quant.is_quantized(plain.unet) and meta["rank"] == 4
    got = lora.get_state(plain.unet)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_an_fsdp_launch_is_refused_rather_than_left_unsharded(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(HypersdError, match="does not run under accelerate's FSDP.*shard_base: true.*quantize_base"):
        Runtime.create("cpu")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert Runtime.create("cpu").world == 1


def test_text_encoders_quantize_with_the_base_and_still_encode():
    t = make_teacher("flux")
    want = t.encode_prompt(["a red square"])
    quant.quantize_teacher(t, "int8", "cpu", text_encoders=True)
    assert quant.is_quantized(t.unet) and quant.is_quantized(t.text_encoder) and quant.is_quantized(t.text_encoder_2)
    got = t.encode_prompt(["a red square"])
    assert got.hidden.dtype == want.hidden.dtype and got.hidden.shape == want.hidden.shape
    assert (got.hidden - want.hidden).norm() < 0.05 * want.hidden.norm()
    assert not quant.is_quantized(t.vae)  # only the encoders and the denoiser


def test_a_plain_run_resumes_on_a_quantized_base(tmp_path, random_teacher_file):
    """quantize_base is a run key: a run checkpointed on the plain base goes on quantized (a smaller card)."""
    def make(**run):
        recipe = _recipe(checkpoint_every=1, **run)
        recipe.teacher = str(random_teacher_file)
        return Distiller(recipe, tmp_path, progress=False)

    first = make()
    assert first.run(max_steps=1) is False
    saved = [p.detach().clone() for p in first.student]
    again = make(quantize_base="int8")
    assert quant.is_quantized(again.teacher.unet)
    assert again.run(resume=True)
    assert any(type(m).__name__ == "TorchaoLoraLinear" for m in again.teacher.unet.modules())
    assert any(not torch.equal(a, b) for a, b in zip(saved, again.student))  # it trained on
