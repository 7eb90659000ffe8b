import pytest
import torch

from hypersd.core.sampling import sample_tcd
from hypersd.core.schedule import inference_timesteps
from hypersd.errors import HypersdError
from hypersd.losses.feedback import (
    RewardTerm,
    draw_stop,
    perceptual_loss,
    reward_hinge,
    reward_loss,
    sample_until,
)
from hypersd.teachers.digits import DigitsTeacher

ACP = DigitsTeacher.new(seed=0).alphas_cumprod


def test_hinge_chases_only_rewards_below_alpha():
    scores = torch.tensor([-2.0, -0.5, 0.3], requires_grad=True)
    loss = reward_hinge(scores, alpha=-0.4)
    assert loss.item() == pytest.approx((1.6 + 0.1 + 0.0) / 3)
    loss.backward()
    assert scores.grad.tolist() == pytest.approx([-1 / 3, -1 / 3, 0.0])
    assert reward_hinge(torch.tensor([1.0, 3.0]), float("inf")).item() == pytest.approx(-2.0)


class Sum(torch.nn.Module):
    def forward(self, images, prompts):
        return images.flatten(1).sum(1)


def test_reward_loss_weights_each_term_and_logs_its_mean():
    x = torch.ones(2, 1, 8, 8)
    terms = [RewardTerm("a", Sum(), weight=2.0, alpha=100.0), RewardTerm("b", Sum(), weight=0.5, alpha=10.0)]
    loss, logs = reward_loss(terms, x, ["p", "q"])
    assert loss.item() == pytest.approx(2.0 * 36 + 0.0)
    assert logs["a"].item() == pytest.approx(64.0)


def test_sample_until_the_last_step_is_the_sampler_with_gradient_only_at_the_end():
    w = torch.tensor(0.3, requires_grad=True)
    eps_fn = lambda x, t: torch.tanh(x) * w * (1 + t / 1000)  # noqa: E731
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = inference_timesteps(4)
    with torch.no_grad():
        want = sample_tcd(eps_fn, noise, ts, ACP)
    got = sample_until(eps_fn, noise, ts, 3, ACP)
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert w.grad is not None and w.grad != 0


def test_draw_stop_respects_the_range_and_refuses_an_empty_one():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        ts, i = draw_stop([1, 2, 4], [200, 800], 1000, g)
        assert 200 <= ts[i] <= 800
        seen.add((len(ts), ts[i]))
    assert seen == {(2, 499), (4, 749), (4, 499), (4, 249)}
    with pytest.raises(HypersdError, match="widen t_range"):
        draw_stop([1], [0, 500], 1000)


def test_perceptual_loss_is_zero_for_a_perfect_denoiser():
    z = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(z)
    t = torch.tensor([10, 300, 600, 990])
    feats = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    exact = lambda x, tt: noise  # noqa: E731
    assert perceptual_loss(feats, exact, z, noise, t, ACP, lambda v: v).item() < 1e-8
    assert perceptual_loss(feats, lambda x, tt: 0 * noise, z, noise, t, ACP, lambda v: v).item() > 1e-3
