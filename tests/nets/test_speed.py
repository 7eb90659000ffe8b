"""Each speed/memory option computes what the plain path computes (tiny UNets, CPU)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from bench_scripts import bench_module
from sd_tiny import TEXT_DIM, _unet

from hypersd import lora
from hypersd.errors import HypersdError
from hypersd.nets import speed
from hypersd.train.recipe import TSCDStage
from hypersd.train.runtime import Runtime
from hypersd.train.stages import TSCDRun


def _student(seed=0):
    torch.manual_seed(seed)
    unet = _unet(layers_per_block=1, cross_attention_dim=TEXT_DIM).requires_grad_(False)
    for name in (lora.STUDENT, lora.EMA):
        lora.add_lora(unet, lora.lora_config(4, 4, "all"), name)
    for p in lora.adapter_params(unet, lora.EMA):
        torch.nn.init.normal_(p, std=0.05)
    lora.activate(unet, lora.STUDENT, trainable=(lora.STUDENT,))
    for p in lora.adapter_params(unet, lora.STUDENT):
        torch.nn.init.normal_(p, std=0.05)
    return unet


def _inputs(n=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([700, 300])[:n],
            torch.randn(n, 16, TEXT_DIM, generator=g))


def _adv_loss_and_grads(unet):
    """TSCD with the adversarial term: its backward runs while the discriminator's pass had
    adapters off, the case a careless checkpoint recomputes with the wrong adapter."""
    from hypersd.teachers.base import Cond, Teacher

    class T(Teacher):
        default_guidance = 2.0

        def __init__(self):
            self.unet, self.alphas_cumprod, self.latent_shape = unet, torch.linspace(0.999, 0.01, 1000), (4, 8, 8)

    teacher = T()
    x, _, hidden = _inputs()
    stage = TSCDStage(name="t", segments=2, batch=2, adv_weight=1.0)
    d = SimpleNamespace(teacher=teacher, recipe=SimpleNamespace(lora_rank=4, lora_alpha=4),
                        generator=torch.Generator().manual_seed(3), uncond_row=Cond(torch.zeros(1, 16, TEXT_DIM)),
                        rt=Runtime())
    torch.manual_seed(5)
    run = TSCDRun(d, stage)
    run.enter(fresh=False)
    loss, _ = run.loss(x, ["a", "b"], Cond(hidden))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in run.params]


def test_gradient_checkpointing_gives_the_same_gradients_across_adapter_switches():
    plain, ckpt = _student(), _student()
    loss0, grads0 = _adv_loss_and_grads(plain)
    speed.gradient_checkpointing(ckpt)
    loss1, grads1 = _adv_loss_and_grads(ckpt)
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads0, grads1))
    assert any(g.abs().sum() > 0 for g in grads1)
    # the adapters stay as the stage left them: student active, not disabled
    assert lora.active(ckpt) == [lora.STUDENT]


def test_channels_last_changes_layout_not_results():
    unet = _student()
    x, t, c = _inputs()
    with torch.no_grad():
        before = unet(x, t, c).sample
        speed.channels_last(unet)
        after = unet(x, t, c).sample
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(before, after, atol=1e-5)


def test_optimizer_choices():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(speed.optimizer(p, 1e-3), torch.optim.AdamW)
    with pytest.raises(HypersdError, match="adamw"):
        speed.optimizer(p, 1e-3, kind="sgd")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(HypersdError, match="pip install bitsandbytes"):
            speed.optimizer(p, 1e-3, kind="adamw8bit")


def test_cpu_adamw_is_foreach_and_steps_the_per_tensor_loop_s_bits():
    """foreach on a CPU (torch's default there is the per-tensor loop): a third faster over a
    LoRA's many small tensors, and the same weights bit for bit, so runs stay byte-identical."""
    def trained(make_opt):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape) * 0.01) for shape in [(8, 4, 3, 3), (16, 8), (4, 16)] * 5]
        opt = make_opt(params)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return opt, params

    opt, ours = trained(lambda ps: speed.optimizer(ps, 1e-3))
    assert opt.param_groups[0]["foreach"] is True
    _, loop = trained(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(ours, loop))


def test_lora_weights_train_in_float32_on_a_bf16_unet():
    unet = _unet(layers_per_block=1, cross_attention_dim=TEXT_DIM).to(torch.bfloat16)
    lora.add_lora(unet, lora.lora_config(4, 4, "all"), lora.STUDENT)
    dtypes = {p.dtype for n, p in unet.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}
    assert unet.conv_in.weight.dtype == torch.bfloat16


def test_compile_blocks_refuses_unknown_kinds():
    with pytest.raises(HypersdError, match="ResnetBlock2D"):
        speed.compile_blocks(_student(), kinds=("Attention2D",))


@pytest.mark.slow
def test_compiled_blocks_match_eager_through_adapter_switches():
    """Teacher (adapters off), EMA target (no grad) and student (with grad) through the compiled
    blocks: the same outputs and gradients as eager, and no recompiles on a second round."""
    from torch._dynamo.utils import counters

    def round_(unet):
        x, t, c = _inputs()
        with torch.no_grad(), lora.adapters_disabled(unet):
            a = unet(x, t, c).sample
        with torch.no_grad(), lora.adapter(unet, lora.EMA):
            b = unet(x, t, c).sample
        s = unet(x, t, c).sample
        s.square().mean().backward()
        grads = [p.grad.clone() for p in lora.adapter_params(unet, lora.STUDENT)]
        for p in lora.adapter_params(unet, lora.STUDENT):
            p.grad = None
        return [a, b, s.detach()], grads

    eager = _student()
    compiled = copy.deepcopy(eager)
    out0, g0 = round_(eager)
    assert speed.compile_blocks(compiled) > 0
    counters.clear()
    out1, g1 = round_(compiled)
    first = dict(counters["stats"])
    out2, _ = round_(compiled)
    assert dict(counters["stats"]) == first  # the second round compiled nothing new
    assert not counters["graph_break"]
    for a, b in zip(out0 + g0, out1 + g1):
        assert torch.allclose(a, b, atol=1e-4)


def test_benchmark_pipeline_is_hypersds_sampler():
    """benchmarks/generate.py writes the sampler out with host-free arithmetic; it must still be
    DDIM trailing as hypersd.core.sampling.sample_tcd does it."""
    from hypersd.core.sampling import sample_tcd
    from hypersd.core.schedule import inference_timesteps

    bench_generate = bench_module("generate")
    p = bench_generate.Pipeline("sd15", torch.device("cpu"), torch.float32, tiny=True)
    with torch.no_grad():
        for k in (1, 4):
            img = p(k)
            hidden, _ = p.encode()
            x0 = sample_tcd(lambda x, t: p.unet(x, torch.full((1,), t), encoder_hidden_states=hidden).sample,
                            p.noise, inference_timesteps(k, 1000), p.acp)
            want = p.vae.decode(x0 / p.vae.config.scaling_factor).sample.clamp(-1, 1)
            assert torch.allclose(img, want, atol=1e-4)


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_benchmark_times_generates_own_path_on_the_same_image(backbone):
    """The benchmark's "pipeline" rows are hypersd generate's path (diffusers' pipeline, hypersd's
    TCD scheduler on the segment boundaries): the same image as the host-free pipeline it times."""
    import argparse

    bench_generate = bench_module("generate")
    p = bench_generate.Pipeline(backbone, torch.device("cpu"), torch.float32, tiny=True)
    with torch.no_grad():
        ref = {k: p(k) for k in (1, 2)}
        rows = []
        bench_generate.pipeline_rows(p, [1, 2], ref, argparse.Namespace(iters=1), rows.append, compile=False)
    assert [(r["steps"], r["variant"]) for r in rows] == [(1, "pipeline"), (2, "pipeline")]
    assert all(r["max_abs_diff"] < 1e-4 for r in rows), rows


def test_benchmark_memory_option_ladder_runs_each_option():
    """train_step.py --options: one SDXL TSCD + adversarial step per option, each added to the one
    before; an option that cannot run here (8-bit AdamW without bitsandbytes) is a row saying why."""
    import importlib.util

    bench_train = bench_module("train_step")
    rows = bench_train.main(["--tiny", "--models", "sd15", "--variants", "tscd", "--no-compile", "--no-flops",
                             "--no-memory", "--options"])
    ladder = [r for r in rows if r["variant"].startswith("tscd-adv options: ")]
    assert [r["variant"].split(": ")[1] for r in ladder] == [name for name, *_ in bench_train.OPTION_LADDER]
    ran = [r for r in ladder if "error" not in r]
    assert len(ran) >= 3 and all(r["samples_per_s"] > 0 for r in ran)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes" in ladder[-1]["error"]


def test_runtime_keys_are_checked_and_leave_the_fingerprint_alone():
    from hypersd.train.recipe import from_dict

    base = {"stages": [{"name": "t", "segments": 2}]}
    plain = from_dict(base)
    fast = from_dict(base | {"mixed_precision": "bf16", "gradient_checkpointing": True, "channels_last": True,
                             "compile": True, "optimizer": "adamw8bit", "device": "cpu"})
    assert plain.fingerprint() == fast.fingerprint()  # a run may resume with other memory settings
    with pytest.raises(HypersdError, match="mixed_precision 'fp8'"):
        from_dict(base | {"mixed_precision": "fp8"})
    with pytest.raises(HypersdError, match="optimizer 'sgd'"):
        from_dict(base | {"optimizer": "sgd"})
    with pytest.raises(HypersdError, match="bf16 or no"):
        from_dict(base | {"mixed_precision": "fp16"})
    for key in ("compile", "fp8_teacher"):
        with pytest.raises(HypersdError, match=f"{key} must be true or false, got 'maybe'"):
            from_dict(base | {key: "maybe"})


def test_bf16_autocast_step_trains_float32_lora_weights():
    """Mixed precision as the trainer runs it: bf16 matmuls, float32 LoRA weights and update."""
    from hypersd.train.runtime import Runtime

    unet = _student()
    rt = Runtime(precision="bf16")
    params = lora.adapter_params(unet, lora.STUDENT)
    before = [p.detach().clone() for p in params]
    opt = speed.optimizer(params, 1e-2)
    x, t, c = _inputs()
    with rt.autocast():
        out = unet(x, t, c).sample
    assert out.dtype == torch.bfloat16
    rt.step(out.float().square().mean(), opt, params, clip=1.0)
    assert all(p.dtype == torch.float32 for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def _guarded(rt, p, opt, loss_fn, role):
    opt.zero_grad(set_to_none=True)
    return rt.step(loss_fn(p), opt, [p], clip=1.0, role=role) is not None  # None: refused


def _inf_grad(p):  # a finite loss (0) whose gradient is inf
    return (p - 1).sqrt().sum()


def test_a_finite_loss_with_non_finite_gradients_is_refused_and_counted():
    from hypersd.train.runtime import Runtime

    rt = Runtime()
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert not _guarded(rt, p, opt, _inf_grad, "discriminator")
    assert torch.equal(p, torch.ones(2)) and not opt.state  # neither the weights nor AdamW's moments moved
    assert rt.guard.counts == {"discriminator": 1}
    assert _guarded(rt, p, opt, lambda p: p.square().sum(), "discriminator") and rt.guard.in_a_row["discriminator"] == 0


def test_fp16_scaler_skips_are_its_own_until_the_scale_is_spent():
    """An overflow the GradScaler skips (it halves its scale) is not a bad step while the scale is
    >= 1; below 1 it is. A NaN loss is bad at once and leaves the scaler alone. One scaler a role."""
    from hypersd.train.runtime import Runtime

    rt = Runtime(precision="fp16")
    rt.guard.limit = 3
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    assert not _guarded(rt, p, opt, lambda p: p.sum() * float("nan"), "fake")
    assert rt.guard.counts == {"fake": 1} and rt.scaler_states() == {}
    for _ in range(17):  # 65536 = 2^16: the 17th skip starts at scale 1
        assert _guarded(rt, p, opt, _inf_grad, "student")
    assert rt.scaler_states()["student"]["scale"] == 0.5 and "student" not in rt.guard.counts
    assert torch.equal(p, torch.ones(2))  # every one of them skipped
    assert not _guarded(rt, p, opt, _inf_grad, "student") and not _guarded(rt, p, opt, _inf_grad, "student")
    with pytest.raises(HypersdError, match="the student optimizer's last 3 steps had a non-finite"):
        _guarded(rt, p, opt, _inf_grad, "student")
    assert _guarded(rt, p, opt, lambda p: p.square().sum(), "discriminator")  # its own scaler, at full scale
    assert rt.scaler_states()["discriminator"]["scale"] == 65536.0 and not torch.equal(p, torch.ones(2))


def test_benchmark_flop_split_accounts_for_every_flop():
    """train_step.py --flop-split: linear, conv and attention shares of a forward, on meta tensors."""
    bench_train = bench_module("train_step")
    for row in bench_train.main(["--tiny", "--flop-split"]):
        shares = [row[k] for k in ("linear", "conv", "attention")]
        assert all(s > 0 for s in shares) and row["other"] == 0  # every op the counter saw has a kind
        assert abs(sum(shares) - 1) < 0.002
