import math

import torch

from hypersd.core.schedule import CLEAN
from hypersd.core.solver import add_noise, cfg, ddim_jump, predict_x0

ACP = torch.linspace(0.99, 0.01, 1000)


def test_jump_by_hand():
    x, eps = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -0.2)
    a_t, a_s = ACP[900].item(), ACP[100].item()
    x0 = (0.5 - math.sqrt(1 - a_t) * -0.2) / math.sqrt(a_t)
    want = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * -0.2
    got = ddim_jump(x, eps, torch.tensor([900]), torch.tensor([100]), ACP)
    assert torch.allclose(got, torch.full_like(x, want), atol=1e-6)
    assert torch.allclose(predict_x0(x, eps, ACP[[900]]), torch.full_like(x, x0), atol=1e-6)


def test_jump_to_clean_is_x0_and_to_itself_is_identity():
    x, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([999, 500, 10])
    assert torch.allclose(ddim_jump(x, eps, t, torch.full_like(t, CLEAN), ACP), predict_x0(x, eps, ACP[t]))
    assert torch.allclose(ddim_jump(x, eps, t, t, ACP), x, atol=1e-5)


def test_jump_inverts_add_noise_with_the_true_noise():
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t, s = torch.tensor([800, 300]), torch.tensor([200, 100])
    xt = add_noise(x0, noise, t, ACP)
    assert torch.allclose(ddim_jump(xt, noise, t, s, ACP), add_noise(x0, noise, s, ACP), atol=1e-5)


def test_cfg_scalar_and_per_sample():
    c, u = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    assert torch.allclose(cfg(c, u, 3.0), torch.full_like(c, 3.0))
    got = cfg(c, u, torch.tensor([0.0, 2.0]))
    assert got.flatten().tolist() == [0.0, 2.0]
