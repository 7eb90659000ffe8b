"""Each network role runs the network it names, and leaves the UNet's adapters as it found them."""

import copy

import pytest
import torch

from hypersd import lora
from hypersd.nets import fp8
from hypersd.nets.roles import Roles
from hypersd.teachers.digits import DigitsTeacher


@pytest.fixture(scope="module")
def _teacher():
    torch.manual_seed(0)
    t = DigitsTeacher.new(seed=0)
    t.unet.requires_grad_(False)
    lora.add_lora(t.unet, lora.lora_config(4, 4), lora.STUDENT)
    spec = lora.spec(t.unet, lora.STUDENT)
    for name in (lora.EMA, lora.FAKE, lora.AVERAGE, lora.FEEDBACK):
        lora.ensure_lora(t.unet, name, **spec)
    with torch.no_grad():  # every adapter unlike the teacher and unlike the others
        for p in lora.adapter_params(t.unet, lora.STUDENT) + [
                p for n in (lora.EMA, lora.FAKE, lora.AVERAGE, lora.FEEDBACK) for p in lora.adapter_params(t.unet, n)]:
            p.add_(0.05 * torch.randn(p.shape))
    lora.activate(t.unet, lora.STUDENT, trainable=(lora.STUDENT,))
    return t


@pytest.fixture
def roles(_teacher):
    return Roles(copy.deepcopy(_teacher))  # each test perturbs and switches its own copy


def _inputs(t, n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn((n, *t.latent_shape), generator=g), torch.tensor([100, 500, 900][:n]), \
        t.encode_prompt(["a handwritten digit three"] * n)


def _perturb(unet, name):
    with torch.no_grad():
        for p in lora.adapter_params(unet, name):
            p.add_(0.1 * torch.randn(p.shape))


def _switch_state(unet):
    return lora.active(unet), [p.requires_grad for _, p in sorted(unet.named_parameters()) if "lora_" in _]


def test_teacher_role_is_the_unet_without_adapters_whatever_the_student(roles):
    t = roles.teacher.teacher
    x, s, cond = _inputs(t)
    out = roles.teacher(x, s, cond)
    with torch.no_grad(), lora.adapters_disabled(t.unet):
        assert torch.equal(out, t.eps(x, s, cond))
    assert not out.requires_grad and out.dtype == torch.float32
    _perturb(t.unet, lora.STUDENT)
    assert torch.equal(roles.teacher(x, s, cond), out)
    assert (roles.student(x, s, cond) - out).abs().max() > 1e-3  # the student is another network


@pytest.mark.parametrize("role, adapter", [("ema", lora.EMA), ("average", lora.AVERAGE), ("fake", lora.FAKE)])
def test_an_adapter_role_follows_its_adapter_only(roles, role, adapter):
    net, t = getattr(roles, role), roles.teacher.teacher
    x, s, cond = _inputs(t)
    with torch.no_grad():
        out = net(x, s, cond)
        with lora.adapter(t.unet, adapter):
            assert torch.equal(out, t.eps(x, s, cond))
    _perturb(t.unet, lora.STUDENT)
    with torch.no_grad():
        assert torch.equal(net(x, s, cond), out)
    _perturb(t.unet, adapter)
    with torch.no_grad():
        assert not torch.equal(net(x, s, cond), out)


@pytest.mark.parametrize("role, trains", [("student", lora.STUDENT), ("fake", lora.FAKE),
                                          ("feedback", lora.FEEDBACK)])
def test_a_trainable_roles_gradients_reach_only_its_adapter(roles, role, trains):
    t = roles.teacher.teacher
    x, s, cond = _inputs(t)
    net = getattr(roles, role)
    with net.running():  # backward inside the pass: autograd fills only weights that train at that moment
        net(x, s, cond).pow(2).mean().backward()
    for name in t.unet.peft_config:
        grads = [p.grad for p in lora.adapter_params(t.unet, name)]
        if name == trains:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None for g in grads), name
    assert all(p.grad is None for n, p in t.unet.named_parameters() if "lora_" not in n)


def test_feedback_role_runs_the_student_and_the_feedback_lora_together(roles):
    t = roles.teacher.teacher
    x, s, cond = _inputs(t)
    with torch.no_grad():
        out = roles.feedback(x, s, cond)
        lora.activate(t.unet, [lora.STUDENT, lora.FEEDBACK])
        assert torch.equal(out, t.eps(x, s, cond))


def test_no_grad_roles_give_no_gradient_even_when_the_caller_wants_one(roles):
    x, s, cond = _inputs(roles.teacher.teacher)
    for net in (roles.teacher, roles.ema, roles.average):
        assert not net(x, s, cond).requires_grad, net.name
    with torch.no_grad():  # a trainable role sampled without gradients (a reward's first steps)
        assert not roles.student(x, s, cond).requires_grad


@pytest.mark.parametrize("role", ["teacher", "student", "ema", "fake", "average", "feedback"])
def test_every_role_puts_back_the_adapters_and_flags_it_found(roles, role):
    unet = roles.teacher.unet
    lora.activate(unet, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))  # a feedback stage's state
    before = _switch_state(unet)
    x, s, cond = _inputs(roles.teacher.teacher)
    getattr(roles, role).cfg(x, s, cond, roles.teacher.teacher.empty_cond(len(cond)), 2.0)
    assert _switch_state(unet) == before
    assert not lora._tuner_layers(unet)[0].disable_adapters


def test_roles_do_not_nest_but_one_role_may_call_itself(roles):
    x, s, cond = _inputs(roles.teacher.teacher)
    with roles.teacher.running():
        inner = roles.teacher(x, s, cond)  # already in place: no second switch to undo the first
        with pytest.raises(RuntimeError, match="the EMA target network was called inside the teacher network's"):
            roles.ema(x, s, cond)
        assert lora._tuner_layers(roles.teacher.unet)[0].disable_adapters  # still the teacher's pass
    assert torch.equal(inner, roles.teacher(x, s, cond))
    roles.ema(x, s, cond)  # free again once the pass is over


def test_only_the_teacher_role_runs_in_fp8(roles, monkeypatch):
    unet = roles.teacher.unet
    assert fp8.enable(unet) > 0
    calls = []
    plain = fp8.Float8Linear._fp8_forward
    monkeypatch.setattr(fp8.Float8Linear, "_fp8_forward", lambda self, x: calls.append(1) or plain(self, x))
    x, s, cond = _inputs(roles.teacher.teacher)
    for net in (roles.student, roles.ema, roles.fake):
        net(x, s, cond)
    assert not calls
    roles.teacher(x, s, cond)  # gradients wanted by the caller: the role turns them off, so FP8 applies
    assert calls
