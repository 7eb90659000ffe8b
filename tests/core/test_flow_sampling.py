"""hypersd's flow samplers against diffusers' flow schedulers, on deterministic toy flow models:
SD3 (inclusive grid, shift 3, the network called at 1000·σ) and FLUX (trailing grid, the dynamic
shift of a resolution, the network called at σ), stepped by a stock FlowMatchEulerDiscreteScheduler
given ``sigmas=schedule.pipeline_sigmas(k)`` (the scheduler applies the shift), and the stochastic
γ sampler against FlowMatchLCMScheduler where the two are one sampler (γ = 1)."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    SD3Transformer2DModel,
)

from hypersd.core import FlowSchedule, flux_shift
from hypersd.core.sampling import sample_tcd
from hypersd.core.schedule import CLEAN
from hypersd.teachers.base import Cond, Teacher

FLUX_SCHED = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)
SEQ_LEN = 1024  # the training resolution's token count: 512² FLUX images


def family(name):
    """(hypersd's schedule, a stock scheduler of that family on its k-step sigmas, the network's time
    unit in the scheduler's ``timesteps``: what the pipeline divides them by before the call)."""
    if name == "sd3":
        sched = FlowSchedule(shift=3.0, timestep_scale=1000.0, spacing="inclusive")

        def stock(k, cls=FlowMatchEulerDiscreteScheduler):
            sch = cls(shift=3.0)
            sch.set_timesteps(sigmas=sched.pipeline_sigmas(k))
            return sch
        return sched, stock, 1.0
    sched = FlowSchedule(shift=flux_shift(SEQ_LEN), timestep_scale=1.0, spacing="trailing")

    def stock(k, cls=FlowMatchEulerDiscreteScheduler):
        sch = cls(**FLUX_SCHED)
        sch.set_timesteps(sigmas=sched.pipeline_sigmas(k), mu=math.log(flux_shift(SEQ_LEN)))
        return sch
    return sched, stock, 1000.0  # FluxPipeline calls the transformer at timestep / 1000


def linear_net(seed=0, c=4):
    """A fixed random channel mix whose output depends on the time it is called with."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(c, c, generator=g) / c, torch.randn(c, generator=g)
    return lambda x, ts: torch.einsum("ij,bjhw->bihw", w, x) * (1 + torch.as_tensor(ts) / 1000) \
        + b.view(1, -1, 1, 1) * 0.1


def transformer_net(unit: float):
    """A tiny random SD3 transformer, called at ``unit``·(the time given) (FLUX's scales σ itself)."""
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()
    g = torch.Generator().manual_seed(2)
    text, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)

    @torch.no_grad()
    def net(x, ts):
        ts = torch.as_tensor(ts, dtype=torch.float32).reshape(-1).expand(len(x)) * unit
        return m(hidden_states=x, encoder_hidden_states=text.expand(len(x), -1, -1),
                 pooled_projections=pooled.expand(len(x), -1), timestep=ts).sample
    return net


def make_net(kind, name):
    return linear_net() if kind == "linear" else transformer_net(1.0 if name == "sd3" else 1000.0)


def stock_run(sch, net, x, per, generator=None):
    """diffusers' loop as the SD3 / FLUX pipelines run it: the network at timestep / ``per``."""
    for t in sch.timesteps:
        x = sch.step(net(x, t / per), t, x, generator=generator).prev_sample
    return x


def ours(sched, net, x, k, **kw):
    return sample_tcd(lambda x_, t: net(x_, sched.model_timestep(t)), x, sched.inference_timesteps(k), sched, **kw)


def x_T(seed=1):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["linear", "sd3-transformer"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_euler_sampler_equals_flow_match_euler_on_the_pipeline_sigmas(name, kind, k):
    sched, stock, per = family(name)
    sch, net = stock(k), make_net(kind, name)
    # the scheduler shifted the given u's onto hypersd's boundaries, and calls the network where hypersd does
    ts = torch.tensor(sched.inference_timesteps(k))
    assert torch.allclose(sch.sigmas[:-1], sched.sigma(ts), atol=1e-7, rtol=0) and sch.sigmas[-1] == 0
    assert torch.allclose(sch.timesteps / per, sched.model_timestep(ts), rtol=1e-6, atol=1e-5)
    x = x_T()
    ref, got = stock_run(sch, net, x, per), ours(sched, net, x, k)
    assert got.std() > 0.1 and (got - x).abs().max() > 0.1
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_gamma_one_equals_flow_match_lcm_scheduler_given_the_same_noise(name, k):
    """Both draw one torch.randn of x's shape per re-noise from the same CPU generator (LCM draws one
    more at its last step, multiplied by σ = 0), so one seed gives one trajectory."""
    sched, stock, per = family(name)
    net, x = make_net("sd3-transformer", name), x_T()
    ref = stock_run(stock(k, FlowMatchLCMScheduler), net, x, per, generator=torch.Generator().manual_seed(7))
    got = ours(sched, net, x, k, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert (got - ref).abs().max() < 1e-5
    other = ours(sched, net, x, k, eta=1.0, generator=torch.Generator().manual_seed(8))
    assert (other - ref).abs().max() > 1e-2  # the noise matters: equal because it is the same noise
    # γ < 1 is not LCM: it keeps part of the trajectory (FlowSchedule.renoise says how)
    assert (ours(sched, net, x, k, eta=0.5, generator=torch.Generator().manual_seed(7)) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
def test_every_gamma_returns_the_point_an_exact_model_knows(name, gamma):
    """Data that is one point x0 has the exact flow v = (x_t − x0)/σ: from any noise, every γ's
    jumps and re-noisings stay on its marginals and end at x0 (a γ read off the wrong σ would not)."""
    sched, _, _ = family(name)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def exact(x_t, t):
        return (x_t - x0) / sched.sigma(torch.as_tensor(t)).reshape(-1, 1, 1, 1)
    got = sample_tcd(exact, x_T(), sched.inference_timesteps(4), sched, eta=gamma,
                     generator=torch.Generator().manual_seed(5))
    assert (got - x0).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_gamma_between_zero_and_one_renoises_from_the_tcd_point(name):
    """One γ step by hand: the Euler jump to σ_s = (1−γ)·σ_next, then the forward transition to σ_next."""
    sched, _, _ = family(name)
    net, x = linear_net(), x_T()
    t, t_next = sched.inference_timesteps(2)
    gamma = 0.4
    s = sched.tcd_point(t_next, gamma)
    sig_t, sig_next = sched.sigma(t).item(), sched.sigma(t_next).item()
    sig_s = sched.sigma(torch.tensor(s)).item()
    assert sig_s == pytest.approx((1 - gamma) * sig_next, abs=1e-6)
    v = net(x, sched.model_timestep(t))
    x_s = x + (sig_s - sig_t) * v
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    a = (1 - sig_next) / (1 - sig_s)
    want = a * x_s + math.sqrt(sig_next ** 2 - (a * sig_s) ** 2) * z
    v2 = net(want, sched.model_timestep(t_next))
    want = want - sig_next * v2  # the last step: x0
    got = ours(sched, net, x, 2, eta=gamma, generator=torch.Generator().manual_seed(9))
    assert (got - want).abs().max() < 1e-5


class _Net(torch.nn.Module):
    """A network with UNet2DConditionModel's call, recording the time it is called with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, sample, timestep, encoder_hidden_states=None):
        self.seen.append(timestep)
        return SimpleNamespace(sample=sample * self.w * timestep.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_flow_teacher_calls_its_network_at_the_schedules_model_timestep(name):
    sched, _, _ = family(name)

    class FlowTeacher(Teacher):
        unet = _Net()
        schedule = sched

    teacher = FlowTeacher()
    t = torch.tensor(sched.inference_timesteps(4))
    x = torch.ones(4, 1, 2, 2)
    out = teacher.eps(x, t, Cond(torch.zeros(4, 1, 1)))
    assert torch.equal(teacher.unet.seen[-1], sched.model_timestep(t))
    assert torch.allclose(out[:, 0, 0, 0], sched.sigma(t) * sched.timestep_scale)
    assert sched.model_timestep(CLEAN).item() == 0.0
