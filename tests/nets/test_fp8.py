"""FP8 teacher passes: close to the plain teacher, and nothing else changes (tiny UNets, CPU)."""

import copy

import pytest
import torch
from test_speed import _inputs, _student

from hypersd import lora
from hypersd.nets import fp8, speed
from hypersd.train.recipe import from_dict


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _passes(unet):
    """Teacher (no grad), the discriminator's read (adapters off, with grad), EMA target, student."""
    x, t, c = _inputs()
    with torch.no_grad(), fp8.teacher_pass(unet):
        teacher = unet(x, t, c).sample
    with fp8.teacher_pass(unet):
        disc = unet(x, t, c).sample.detach()
    with torch.no_grad(), lora.adapter(unet, lora.EMA):
        ema = unet(x, t, c).sample
    student = unet(x, t, c).sample.detach()
    return teacher, disc, ema, student


def test_quantize_rows_keeps_each_row_within_e4m3_rounding():
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8).unsqueeze(1)  # rows of very different scales
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), fp8.E4M3_MAX))  # each row's range used
    back = q.float() * scale
    # three mantissa bits: at most half a step of 2^-3 relative, plus the subnormal floor
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2**-9).all()


def test_teacher_passes_run_in_fp8_and_every_other_pass_is_untouched():
    plain = _student()
    quick = copy.deepcopy(plain)
    keys = set(quick.state_dict())
    n = fp8.enable(quick)
    assert n > 0 and any(isinstance(m, fp8.Float8Linear) for m in quick.modules())
    assert set(quick.state_dict()) == keys  # the FP8 copies stay out of checkpoints and LoRA files
    with torch.no_grad():
        want = _passes(plain)
    got = _passes(quick)
    teacher_err = _rel(got[0], want[0])
    assert 0 < teacher_err < 0.05  # the FP8 path ran, and stays close (1.2% measured)
    for a, b in zip(got[1:], want[1:]):  # gradients on, or adapters on: the weights as they are
        assert torch.equal(a, b)
    fp8.disable(quick)
    assert not any(isinstance(m, fp8.Float8Linear) for m in quick.modules())
    assert torch.equal(_passes(quick)[0], want[0])


def test_fp8_teacher_under_bf16_autocast_gives_autocasts_dtype():
    plain = _student()
    quick = copy.deepcopy(plain)
    fp8.enable(quick)
    x, t, c = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with fp8.teacher_pass(plain):
            want = plain(x, t, c).sample
        with fp8.teacher_pass(quick):
            got = quick(x, t, c).sample
    assert got.dtype == want.dtype == torch.bfloat16
    assert 0 < _rel(got, want) < 0.05


def test_fp8_copies_skip_trained_lora_layers_and_odd_shapes():
    unet = _student()
    fp8.enable(unet)
    for name, m in unet.named_modules():
        if "lora_" in name:
            assert not isinstance(m, fp8.Float8Linear), name
        if isinstance(m, fp8.Float8Linear):
            assert m.in_features % 16 == 0 and m.out_features % 16 == 0
            assert not m.weight.requires_grad
    odd = torch.nn.Sequential(torch.nn.Linear(24, 32)).requires_grad_(False)
    assert fp8.enable(odd) == 0


def test_consistency_targets_with_fp8_teacher_stay_close():
    """TSCD's target (teacher CFG pair, then EMA) with and without FP8: close, same draws."""
    from hypersd.losses.tscd import ConsistencyConfig, ConsistencyStep
    from hypersd.teachers.base import Cond, Teacher

    def targets(unet):
        class T(Teacher):
            default_guidance = 2.0

            def __init__(self):
                self.unet, self.alphas_cumprod, self.latent_shape = unet, torch.linspace(0.999, 0.01, 1000), (4, 8, 8)

        x, _, hidden = _inputs()
        step = ConsistencyStep(T(), ConsistencyConfig(segments=2, guidance=(2.0, 2.0)))
        pred, tgt, t_end = step(x, Cond(hidden), Cond(torch.zeros_like(hidden)), torch.Generator().manual_seed(4))
        return pred.detach(), tgt, t_end

    plain = _student()
    quick = copy.deepcopy(plain)
    fp8.enable(quick)
    (p0, y0, e0), (p1, y1, e1) = targets(plain), targets(quick)
    assert torch.equal(e0, e1) and torch.equal(p0, p1)  # the student's prediction is the plain one
    assert 0 < _rel(y1, y0) < 0.1


@pytest.mark.slow
def test_compiled_blocks_trace_the_fp8_layers_without_graph_breaks():
    from torch._dynamo.utils import counters

    unet = _student()
    fp8.enable(unet)
    x, t, c = _inputs()
    with torch.no_grad(), fp8.teacher_pass(unet):
        eager = unet(x, t, c).sample
    assert speed.compile_blocks(unet, backend="aot_eager") > 0
    counters.clear()
    with torch.no_grad(), fp8.teacher_pass(unet):
        compiled = unet(x, t, c).sample
    assert not counters["graph_break"]
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_fp8_teacher_is_a_runtime_key():
    base = {"stages": [{"name": "t", "segments": 2}]}
    assert from_dict(base | {"fp8_teacher": True}).fingerprint() == from_dict(base).fingerprint()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpus_without_fp8_units_are_refused():
    from hypersd.errors import HypersdError

    if torch.cuda.get_device_capability() >= (8, 9):
        fp8.check_device(torch.device("cuda"))
    else:
        with pytest.raises(HypersdError, match="fp8_teacher: false"):
            fp8.check_device(torch.device("cuda"))
