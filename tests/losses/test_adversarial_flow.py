"""The adversarial term on transformer teachers: the frozen transformer's first half as the
discriminator's backbone, on the digits flow teacher (SD3's MMDiT), a tiny SD3 and a tiny FLUX."""

import pytest
import torch
from flow_tiny import T5_LENGTH, tiny_flux_pipeline, tiny_sd3_pipeline

from hypersd import lora
from hypersd.losses.adversarial import (
    Discriminator,
    DiscriminatorHeads,
    encoder_features,
    feature_blocks,
    hinge_d_loss,
    hinge_g_loss,
)
from hypersd.nets.roles import Roles
from hypersd.teachers.digits_flow import FlowDigitsTeacher
from hypersd.teachers.flux import FluxTeacher
from hypersd.teachers.sd import place
from hypersd.teachers.sd3 import SD3Teacher

KINDS = ("digits-flow", "sd3", "flux")


def _parts(pipe):
    parts = dict(pipe.components)
    sched = dict(parts.pop("scheduler").config)
    parts = {k: v for k, v in parts.items() if v is not None}
    place(parts, "cpu", None)
    return parts, sched


def make_teacher(kind):
    if kind == "digits-flow":
        t = FlowDigitsTeacher.new(seed=0)
        t.unet.requires_grad_(False)
        return t
    if kind == "sd3":
        parts, sched = _parts(tiny_sd3_pipeline(0))
        return SD3Teacher(**parts, scheduler_config=sched, max_sequence_length=T5_LENGTH)
    parts, sched = _parts(tiny_flux_pipeline(0))
    return FluxTeacher(**parts, scheduler_config=sched, resolution=16, max_sequence_length=T5_LENGTH)


@pytest.fixture(scope="module", params=KINDS)
def teacher(request):
    return make_teacher(request.param)


def _batch(t, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *t.latent_shape), generator=g)
    with torch.no_grad():  # as the trainer encodes prompts: the text encoder is not trained here
        cond = t.encode_prompt(["a handwritten digit seven", "two", "one"][:n])
    return x, torch.tensor([900, 400, 30][:n]), cond


def _grid(t):
    _, h, w = t.latent_shape
    return (h // 2, w // 2)  # 2x2 patches: SD3's patch_size, FLUX's packing


def test_features_are_the_transformers_own_image_tokens_on_the_patch_grid(teacher):
    x, ts, cond = _batch(teacher)
    net = teacher.unet
    blocks = feature_blocks(len(net.transformer_blocks))
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o[1]))
             for k, b in enumerate(net.transformer_blocks)]
    with torch.no_grad():
        teacher.eps(x, ts, cond)  # the network's own forward, hooked at each block
        for h in hooks:
            h.remove()
        feats = encoder_features(net, teacher.network_inputs(x, ts, cond))
    width = net.config.num_attention_heads * net.config.attention_head_dim
    assert len(feats) == len(blocks) >= 1
    for f, k in zip(feats, blocks):
        assert f.dtype == torch.float32 and f.shape == (3, width, *_grid(teacher))
        tokens = f.flatten(2).transpose(1, 2)  # back to row-major tokens
        assert torch.allclose(tokens, seen[k].float(), atol=1e-5)
    heads = DiscriminatorHeads.for_network(net)
    assert len(heads.heads) == len(feats) and heads(feats).shape == (3,)


def test_feature_blocks_run_to_the_middle_every_other_one():
    assert feature_blocks(1) == [0] and feature_blocks(2) == [0] and feature_blocks(4) == [0, 2]
    assert feature_blocks(24) == [0, 2, 4, 6, 8, 10, 12] and feature_blocks(19) == [0, 2, 4, 6, 8]


def test_discriminator_steps_separate_real_from_fake(teacher):
    torch.manual_seed(0)
    x, ts, cond = _batch(teacher, n=2)
    real, fake = x.abs() * 0.5 + 0.5, -x.abs() * 0.5 - 0.5  # separable: positive against negative samples
    heads = DiscriminatorHeads.for_network(teacher.unet, hidden=16)
    disc = Discriminator(teacher, heads)
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3, betas=(0.0, 0.99))
    losses = []
    for _ in range(12):
        loss = hinge_d_loss(disc(real, ts[:2], cond), disc(fake, ts[:2], cond))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in heads.parameters())
        assert all(h[-1].weight.grad.abs().sum() > 0 for h in heads.heads) or loss.item() == 0
        assert all(p.grad is None for p in teacher.unet.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_generator_loss_reaches_the_student_lora_not_the_transformer(teacher):
    import copy

    t = copy.deepcopy(teacher)
    lora.add_lora(t.unet, lora.lora_config(4, 4), lora.STUDENT)
    with torch.no_grad():  # a student unlike the teacher, so that its LoRA has a gradient at all
        for p in lora.adapter_params(t.unet, lora.STUDENT):
            p.add_(0.05 * torch.randn(p.shape))
    lora.activate(t.unet, lora.STUDENT, trainable=(lora.STUDENT,))
    x, ts, cond = _batch(t, n=2)
    disc = Discriminator(t, DiscriminatorHeads.for_network(t.unet, hidden=16))
    # the backbone is the bare teacher: the student's adapter, active around the call, is off inside it
    with torch.no_grad():
        logits_with_student = disc(x, ts[:2], cond)
        with lora.adapters_disabled(t.unet):
            bare = disc.heads(encoder_features(t.unet, t.network_inputs(x, ts[:2], cond)))
    assert torch.allclose(logits_with_student, bare, atol=1e-6)
    pred = Roles(t).student(x, ts[:2], cond)
    hinge_g_loss(disc(pred, ts[:2], cond)).backward()
    student = lora.adapter_params(t.unet, lora.STUDENT)
    assert student and all(p.grad is not None for p in student)
    assert sum(p.grad.abs().sum() for p in student) > 0
    ids = {id(p) for p in student}
    assert all(p.grad is None for p in t.unet.parameters() if id(p) not in ids)


def test_a_network_without_a_backbone_is_refused_naming_the_fix():
    from hypersd.errors import HypersdError

    with pytest.raises(HypersdError, match="no discriminator backbone for a Linear teacher.*adv_weight: 0"):
        DiscriminatorHeads.for_network(torch.nn.Linear(2, 2))
