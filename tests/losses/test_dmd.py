import pytest
import torch

from hypersd.core.solver import predict_x0
from hypersd.losses.dmd import (
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    draw_generator_step,
    generate,
    red_loss,
    regression_loss,
    score_x0,
    simulate,
)
from hypersd.teachers.digits import DigitsTeacher

ACP = DigitsTeacher.new(seed=0).alphas_cumprod


def test_dmd_gradient_is_normalised_per_sample():
    x = torch.zeros(2, 1, 2, 2)
    real = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    fake = real + torch.tensor([0.5, -1.0]).view(2, 1, 1, 1)
    g = dmd_gradient(x, real, fake)
    assert g[0].flatten().tolist() == pytest.approx([0.5] * 4)  # 0.5 / mean|0 - 1|
    assert g[1].flatten().tolist() == pytest.approx([-0.5] * 4)  # -1 / mean|0 - 2|


def test_dmd_loss_gradient_is_the_dmd_gradient():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    g = torch.randn(3, 1, 4, 4)
    dmd_loss(x, g).backward()
    assert torch.allclose(x.grad, g / x.numel(), atol=1e-7)


def test_red_loss_pulls_the_sample_to_its_denoised_version_only():
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    denoised = torch.randn(2, 1, 4, 4, requires_grad=True)
    red_loss(x, denoised).backward()
    assert torch.allclose(x.grad, (x - denoised).detach() / x.numel(), atol=1e-7)
    assert denoised.grad is None  # the target is held: no gradient runs into the real score
    assert red_loss(denoised.detach(), denoised.detach()).item() == 0


def test_regression_l1_settles_on_the_median_where_mse_settles_on_the_mean():
    # one pixel that must serve five targets it cannot tell apart: four black, one white
    targets = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0]).view(5, 1, 1, 1)
    for distance, expected in (("mse", -0.6), ("l1", -1.0)):
        x = torch.zeros(1, 1, 1, 1, requires_grad=True)
        opt = torch.optim.SGD([x], lr=0.05)
        for _ in range(400):
            opt.zero_grad()
            regression_loss(x.expand(5, 1, 1, 1), targets, distance).backward()
            opt.step()
        assert x.item() == pytest.approx(expected, abs=0.06), distance
    x, target = torch.randn(2, 1, 4, 4, requires_grad=True), torch.randn(2, 1, 4, 4, requires_grad=True)
    regression_loss(x, target, "l1").backward()
    assert torch.allclose(x.grad, (x - target).sign().detach() / x.numel())
    assert target.grad is None  # the teacher's ODE output is held
    with pytest.raises(ValueError, match="unknown regression distance"):
        regression_loss(target, target, "l2")


def test_generator_and_scores_invert_the_noising():
    x0 = torch.rand(2, 1, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 900])
    assert torch.allclose(score_x0(lambda xt, tt: noise, x0, noise, t, ACP), x0, atol=1e-4)
    assert denoising_loss(lambda xt, tt: noise, x0, noise, t, ACP).item() == 0
    out = generate(lambda x, tt: 0.5 * x, noise, 999, ACP)
    want = predict_x0(noise, 0.5 * noise, ACP[999].expand(2))
    assert torch.allclose(out, want)


def test_one_step_generator_draws_nothing_and_multi_step_draws_every_sampler_step():
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert {draw_generator_step([1], g) for _ in range(20)} == {(1, 0)}
    assert torch.equal(g.get_state(), before)  # the one-step stage's random stream is as it was
    drawn = {draw_generator_step([1, 2, 4], g) for _ in range(400)}
    assert drawn == {(1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)}


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_simulate_is_where_the_sampler_goes_on_from(eta):
    """The backward simulation to step i, then the sampler's remaining steps: the whole sampler."""
    from hypersd.core.sampling import sample_tcd

    def eps_fn(x, t):
        return 0.3 * x + 0.001 * t

    timesteps, noise = [999, 749, 499, 249], torch.randn(2, 1, 4, 4)
    whole = sample_tcd(eps_fn, noise, timesteps, ACP, eta=eta, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x2 = simulate(eps_fn, noise, timesteps, 2, ACP, eta=eta, generator=g)
    assert torch.equal(simulate(eps_fn, noise, timesteps, 0, ACP), noise)
    assert not torch.allclose(x2, noise)
    assert torch.allclose(sample_tcd(eps_fn, x2, timesteps[2:], ACP, eta=eta, generator=g), whole, atol=1e-6)
