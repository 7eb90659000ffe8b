import pytest
import torch

from hypersd.digits.data import prompts_for
from hypersd.losses.adversarial import (
    DiscriminatorHeads,
    encoder_features,
    hinge_d_loss,
    hinge_g_loss,
)
from hypersd.teachers.digits import DigitsTeacher


def test_hinge_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; relu(1-3)=0, relu(1+0)=1 -> 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.75)
    assert hinge_g_loss(fake).item() == pytest.approx(1.5)


def test_encoder_features_are_the_unets_own_down_path():
    t = DigitsTeacher.new(seed=5)
    x, ts = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990])
    cond = t.encode_prompt(prompts_for([1, 2, 3]))
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for b in [*t.unet.down_blocks, t.unet.mid_block]]
    with torch.no_grad():
        t.eps(x, ts, cond)
        for h in hooks:
            h.remove()
        feats = encoder_features(t.unet, t.network_inputs(x, ts, cond))
    assert len(feats) == len(seen) == 4
    for a, b in zip(feats, seen):
        assert torch.allclose(a, b, atol=1e-5)
    logits = DiscriminatorHeads.for_network(t.unet)(feats)
    assert logits.shape == (3,)
