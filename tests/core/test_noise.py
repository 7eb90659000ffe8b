"""The noise schedule of both families (hypersd.core): parameterisations, jumps, re-noising, grids,
and the samplers against diffusers' own schedulers."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from hypersd.core import DDPMSchedule, FlowSchedule, flux_shift
from hypersd.core.noise import FLUX_T, NoiseSchedule
from hypersd.core.sampling import sample_tcd
from hypersd.core.schedule import CLEAN, Segments, alpha_bar
from hypersd.errors import HypersdError

SD_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FLUX_SCHED = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)


@pytest.fixture(scope="module")
def acp():
    return DDIMScheduler(**SD_SCHED).alphas_cumprod.float()


def sd3():
    return FlowSchedule(shift=3.0, timestep_scale=1000.0, spacing="inclusive")


def flux(seq_len):
    """FLUX's schedule as its teacher builds it: T = FLUX_T = 1200 (16 divides it)."""
    return FlowSchedule(shift=flux_shift(seq_len), timestep_scale=1.0, spacing="trailing", T=FLUX_T)


def stock_sd3(k):
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(k)
    return sch


def stock_flux(k, seq_len, cls=FlowMatchEulerDiscreteScheduler):
    # what FluxPipeline does: sigmas linspace(1, 1/k, k), mu from the token count
    sch = cls(**FLUX_SCHED)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    return sch


def tiny_net(seed=0, c=4):
    """A fixed random 'network': a channel mix that depends on the timestep it is called with."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(c, c, generator=g) / c, torch.randn(c, generator=g)
    return lambda x, ts: torch.einsum("ij,bjhw->bihw", w, x) * (1 + ts / 1000) + b.view(1, -1, 1, 1) * 0.1


def randn(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- parameterisations ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddpm_round_trip_recovers_x0_and_eps_from_the_true_output(acp, kind):
    sched = DDPMSchedule(acp, kind)
    x0, eps, t = randn(5, 4, 6, 6), randn(5, 4, 6, 6, seed=2), torch.tensor([0, 24, 499, 750, 999])
    x_t = sched.add_noise(x0, eps, t)
    out = sched.target(x0, eps, t)
    assert torch.equal(out, eps) == (kind == "epsilon")
    x0_hat, eps_hat = sched.to_x0_eps(x_t, out, t)
    # x0 at t = 999 divides by √ᾱ = 0.068: float32 rounding there is ~1e-5
    assert torch.allclose(x0_hat, x0, atol=5e-5) and torch.allclose(eps_hat, eps, atol=5e-5)


def test_flow_round_trip_and_coefficients():
    sched = sd3()
    x0, eps, t = randn(4, 4, 6, 6), randn(4, 4, 6, 6, seed=2), torch.tensor([0, 280, 560, 840])
    assert torch.equal(sched.alpha(t), 1 - sched.sigma(t))
    assert sched.sigma(CLEAN).item() == 0.0 and sched.sigma(840).item() == 1.0
    x_t = sched.add_noise(x0, eps, t)
    x0_hat, eps_hat = sched.to_x0_eps(x_t, sched.target(x0, eps, t), t)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)


def test_flow_jump_is_the_euler_step_and_the_generic_jump():
    sched = sd3()
    x, v = randn(3, 4, 6, 6), randn(3, 4, 6, 6, seed=2)
    t, s = torch.tensor([840, 560, 20]), torch.tensor([560, 100, CLEAN])
    dt = (sched.sigma(s) - sched.sigma(t)).view(-1, 1, 1, 1)
    assert torch.equal(sched.jump(x, v, t, s), x + dt * v)
    # α_s·x̂0 + σ_s·ε̂, the jump every family shares, is the same step
    assert torch.allclose(NoiseSchedule.jump(sched, x, v, t, s), x + dt * v, atol=1e-6)
    assert torch.equal(sched.jump(x, v, t, t), x)
    assert torch.allclose(sched.jump(x, v, t, torch.full_like(t, CLEAN)), sched.to_x0_eps(x, v, t)[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddpm_jump_to_itself_is_identity_and_to_clean_is_x0(acp, kind):
    sched = DDPMSchedule(acp, kind)
    x, out = randn(2, 4, 6, 6), randn(2, 4, 6, 6, seed=2)
    t = torch.tensor([999, 249])
    assert torch.equal(sched.jump(x, out, t, t), x)
    assert torch.equal(sched.jump(x, out, t, torch.tensor([CLEAN, CLEAN])), sched.to_x0_eps(x, out, t)[0])


# -- the DDPM path is what it was --------------------------------------------------------------
def _old_x0(x_t, eps, a):
    a = a.float().reshape(-1, *([1] * (x_t.dim() - 1)))
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def _old_jump(x_t, eps, t, s, acp):
    """hypersd.core.solver.ddim_jump before the schedule existed, as the oracle."""
    x0 = _old_x0(x_t, eps, alpha_bar(acp, t))
    a_s = alpha_bar(acp, s).float().reshape(-1, *([1] * (x_t.dim() - 1)))
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def _old_tcd(eps_fn, x, timesteps, acp, eta, generator):
    for i, t in enumerate(timesteps):
        eps = eps_fn(x, t)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        s = CLEAN if t_next == CLEAN else math.floor((1 - eta) * t_next)
        x = _old_jump(x, eps, t, s, acp)
        if t_next != CLEAN and s != t_next:
            ratio = alpha_bar(acp, t_next) / alpha_bar(acp, s)
            noise = torch.randn(x.shape, generator=generator)
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * noise
    return x


def test_ddpm_epsilon_schedule_gives_the_old_jump_noise_and_sampler_bit_for_bit(acp):
    sched = DDPMSchedule(acp)
    x, eps = randn(3, 4, 6, 6), randn(3, 4, 6, 6, seed=2)
    t, s = torch.tensor([999, 499, 24]), torch.tensor([749, CLEAN, 0])
    assert torch.equal(sched.jump(x, eps, t, s), _old_jump(x, eps, t, s, acp))
    a = alpha_bar(acp, t).view(-1, 1, 1, 1)
    assert torch.equal(sched.add_noise(x, eps, t), a.sqrt() * x + (1 - a).sqrt() * eps)
    net = tiny_net()
    fn = lambda x, t: net(x, torch.tensor(float(t)))
    for eta in (0.0, 0.3, 1.0):
        new = sample_tcd(fn, x, [999, 749, 499, 249], sched, eta=eta, generator=torch.Generator().manual_seed(5))
        old = _old_tcd(fn, x, [999, 749, 499, 249], acp, eta, torch.Generator().manual_seed(5))
        assert torch.equal(new, old)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_v_prediction_sampler_equals_diffusers_ddim_trailing(acp, k):
    sched = DDPMSchedule(acp, "v_prediction")
    ddim = DDIMScheduler(**SD_SCHED, timestep_spacing="trailing", prediction_type="v_prediction",
                         set_alpha_to_one=True, clip_sample=False)
    ddim.set_timesteps(k)
    net, x = tiny_net(), randn(2, 4, 6, 6)
    ref = x.clone()
    for t in ddim.timesteps:
        ref = ddim.step(net(ref, t.float()), t, ref, eta=0.0).prev_sample
    ours = sample_tcd(lambda x, t: net(x, torch.tensor(float(t))), x, sched.inference_timesteps(k), sched)
    # diffusers' last step lands on ᾱ = 1 (set_alpha_to_one), i.e. our clean end
    assert torch.allclose(ours, ref, atol=1e-5)


# -- re-noising ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_renoise_gives_the_marginal_of_the_later_timestep(acp, family):
    sched, s, t = (DDPMSchedule(acp), 249, 749) if family == "ddpm" else (sd3(), 200, 600)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 1.5)
    x_s = sched.add_noise(x0, randn(n, 1, 1, 1, seed=3), s)
    x_t = sched.renoise(x_s, s, t, randn(n, 1, 1, 1, seed=4))
    a_t, s_t = sched.alpha(t).item(), sched.sigma(t).item()
    assert x_t.mean().item() == pytest.approx(a_t * 1.5, abs=0.01)
    assert x_t.std().item() == pytest.approx(s_t, rel=0.01)
    # re-noising from s to itself adds nothing
    assert torch.allclose(sched.renoise(x_s[:10], s, s, randn(10, 1, 1, 1)), x_s[:10], atol=1e-6)


# -- flow grids and boundaries -----------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_sd3_boundaries_are_the_stock_schedulers_sigmas_and_on_the_solver_grid(k):
    sched, stock = sd3(), stock_sd3(k)
    ts = sched.inference_timesteps(k)
    assert torch.allclose(sched.sigma(torch.tensor(ts)), stock.sigmas[:-1], atol=1e-7, rtol=0)
    assert torch.allclose(sched.model_timestep(torch.tensor(ts)), stock.timesteps, atol=1e-4, rtol=0)
    seg = Segments(k, sched.solver_grid(43))  # one grid holds the boundaries of every k
    assert seg.boundaries == ts and set(ts) <= set(seg.grid.points.tolist())
    assert sched.timesteps_for_sigmas(stock.sigmas[:-1], seg.grid) == ts


@pytest.mark.parametrize("seq_len", [1024, 4096])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_flux_boundaries_are_the_pipelines_sigmas_at_the_training_resolution(k, seq_len):
    sched, stock = flux(seq_len), stock_flux(k, seq_len)
    ts = sched.inference_timesteps(k)
    assert ts == Segments(k, sched.solver_grid(40)).boundaries
    assert torch.allclose(sched.sigma(torch.tensor(ts)), stock.sigmas[:-1], atol=1e-7, rtol=0)
    # FluxPipeline calls the transformer with timestep / 1000 = σ
    assert torch.allclose(sched.model_timestep(torch.tensor(ts)), stock.timesteps / 1000, atol=1e-6)


@pytest.mark.parametrize("seq_len", [1024, 4096])
def test_flux_16_segment_boundaries_are_the_pipelines_16_step_sigmas(seq_len):
    """T = 1200: FluxPipeline's 16-step sigmas are the boundaries of 16 segments on the N = 48 grid,
    which also holds 1, 2, 4 and 8; the N = 40 grid of 1..8 is refused for 16, naming N = 48."""
    sched, stock = flux(seq_len), stock_flux(16, seq_len)
    ts = sched.inference_timesteps(16)
    assert ts == list(range(1199, 0, -75)) and sched.pipeline_sigmas(16) == pytest.approx(np.linspace(1, 1 / 16, 16))
    grid = sched.solver_grid(48)
    assert Segments(16, grid).boundaries == ts
    assert sched.timesteps_for_sigmas(stock.sigmas[:-1], grid) == ts
    assert torch.allclose(sched.sigma(torch.tensor(ts)), stock.sigmas[:-1], atol=1e-7, rtol=0)
    for k in (1, 2, 4, 8):
        assert Segments(k, grid).boundaries == Segments(k, sched.solver_grid(40)).boundaries
    with pytest.raises(HypersdError, match=r"k=16 are not on the N=40 solver grid \(T=1200, trailing spacing\); "
                                           r"choose N a multiple of k, e.g. N=48 for k in 1, 2, 4, 8, 16"):
        Segments(16, sched.solver_grid(40))
    with pytest.raises(HypersdError, match="7 steps do not divide the 1200 .*pick a divisor of 1200"):
        sched.inference_timesteps(7)
    with pytest.raises(HypersdError, match="16 steps do not divide the 1000 .*pick a divisor of 1000"):
        FlowSchedule(shift=flux_shift(seq_len), timestep_scale=1.0, spacing="trailing").inference_timesteps(16)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
def test_flux_shift_is_diffusers_dynamic_shift(seq_len):
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert flux_shift(seq_len) == pytest.approx(math.exp(mu), rel=1e-12)
    u = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    sch = FlowMatchEulerDiscreteScheduler(**FLUX_SCHED)
    ours = flux_shift(seq_len) * u / (1 + (flux_shift(seq_len) - 1) * u)
    assert torch.allclose(ours, sch.time_shift(mu, 1.0, u), atol=1e-12)


def test_inclusive_grid_that_misses_a_boundary_is_refused():
    with pytest.raises(HypersdError, match="N=43"):
        Segments(4, sd3().solver_grid(40))  # 40 points: a step of 840/39 is not an integer
    with pytest.raises(HypersdError, match="not on the N=13"):
        Segments(8, sd3().solver_grid(13))  # 12 intervals of 70: 4-step boundaries fit, 8-step ones do not
    Segments(4, sd3().solver_grid(13))


def test_a_shift_that_moves_a_boundary_off_the_grid_is_refused():
    sched = sd3()
    grid = sched.solver_grid(43)
    other = FlowMatchEulerDiscreteScheduler(shift=2.0)
    other.set_timesteps(4)
    with pytest.raises(HypersdError, match="shift 3 .*shift differs"):
        sched.timesteps_for_sigmas(other.sigmas[:-1], grid)
    # FLUX trained at 512² (1024 tokens), sampled at 1024² (4096 tokens): another shift
    with pytest.raises(HypersdError, match="step 2 of 4"):
        flux(1024).timesteps_for_sigmas(stock_flux(4, 4096).sigmas[:-1], flux(1024).solver_grid(40))
    assert flux(1024).timesteps_for_sigmas(stock_flux(4, 1024).sigmas[:-1]) == [1199, 899, 599, 299]


def test_pipeline_sigmas_put_a_stock_scheduler_on_the_boundaries():
    """Where the stock default cannot serve: FLUX at 1024² with a LoRA trained at 512²."""
    sched = flux(1024)
    sch = FlowMatchEulerDiscreteScheduler(**FLUX_SCHED)
    sch.set_timesteps(sigmas=sched.pipeline_sigmas(4), mu=math.log(sched.shift))
    assert sched.timesteps_for_sigmas(sch.sigmas[:-1], sched.solver_grid(40)) == [1199, 899, 599, 299]
    sd = sd3()
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(sigmas=sd.pipeline_sigmas(8))
    assert torch.allclose(sch.sigmas, stock_sd3(8).sigmas, atol=1e-7)


# -- flow samplers against diffusers ----------------------------------------------------------
def _stock_run(sch, net, x, generator=None):
    for t in sch.timesteps:
        x = sch.step(net(x, t), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_flow_euler_sampler_equals_flow_match_euler_discrete_scheduler(k):
    sched, net, x = sd3(), tiny_net(), randn(2, 4, 8, 8)
    ref = _stock_run(stock_sd3(k), net, x)
    ours = sample_tcd(lambda x, t: net(x, sched.model_timestep(t)), x, sched.inference_timesteps(k), sched)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_flux_euler_sampler_equals_the_pipelines_scheduler(k):
    sched, net, x = flux(4096), tiny_net(), randn(2, 4, 8, 8)
    ref = _stock_run(stock_flux(k, 4096), lambda x, t: net(x, t / 1000), x)
    ours = sample_tcd(lambda x, t: net(x, sched.model_timestep(t)), x, sched.inference_timesteps(k), sched)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_flow_gamma_one_equals_flow_match_lcm_scheduler(k):
    """γ = 1 jumps to the clean end and re-noises to σ_next: what FlowMatchLCMScheduler does at
    every step. Both draw one torch.randn of x's shape per re-noise, so the same seed matches."""
    sched, net, x = sd3(), tiny_net(), randn(2, 4, 8, 8)
    lcm = FlowMatchLCMScheduler(shift=3.0)
    lcm.set_timesteps(k)
    assert torch.allclose(lcm.sigmas, stock_sd3(k).sigmas)
    ref = _stock_run(lcm, net, x, generator=torch.Generator().manual_seed(7))
    ours = sample_tcd(lambda x, t: net(x, sched.model_timestep(t)), x, sched.inference_timesteps(k), sched,
                      eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(ours, ref, atol=1e-5)
    # γ < 1 is another sampler: it keeps part of the trajectory
    mid = sample_tcd(lambda x, t: net(x, sched.model_timestep(t)), x, sched.inference_timesteps(k), sched,
                     eta=0.5, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(mid, ref, atol=1e-3)


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.9])
def test_flow_tcd_point_is_gamma_of_the_way_to_clean_in_sigma(gamma):
    sched = sd3()
    for t_next in (560, 280, 0):
        s = sched.tcd_point(t_next, gamma)
        assert sched.sigma(torch.tensor(s)).item() == pytest.approx((1 - gamma) * sched.sigma(t_next).item(), abs=1e-6)
    assert sched.tcd_point(560, 0.0) == 560 and sched.tcd_point(560, 1.0) == CLEAN


# -- bad input -------------------------------------------------------------------------------------
def test_unknown_prediction_type_and_mismatched_declaration_are_refused(acp):
    with pytest.raises(HypersdError, match="unknown prediction_type 'sample'"):
        DDPMSchedule(acp, "sample")
    config = dict(SD_SCHED, prediction_type="v_prediction")
    with pytest.raises(HypersdError, match="declared 'epsilon' but .* predicts 'v_prediction'"):
        DDPMSchedule.from_scheduler_config(config, declared="epsilon")
    assert DDPMSchedule.from_scheduler_config(config).prediction_type == "v_prediction"
    with pytest.raises(HypersdError, match="unknown flow spacing"):
        FlowSchedule(3.0, spacing="leading")


@pytest.mark.parametrize("make", [lambda a: DDPMSchedule(a, "v_prediction"), lambda a: sd3()])
def test_dmd_fake_score_regresses_the_schedules_own_target(acp, make):
    from hypersd.losses.dmd import denoising_loss

    sched, x, noise = make(acp), randn(3, 4, 6, 6), randn(3, 4, 6, 6, seed=2)
    t = torch.tensor([700, 300, 20])
    true = lambda x_t, t_: sched.target(x, noise, t_)
    assert denoising_loss(true, x, noise, t, sched).item() < 1e-10
    assert denoising_loss(lambda x_t, t_: noise, x, noise, t, sched).item() > 0.1  # ε is the wrong target here
