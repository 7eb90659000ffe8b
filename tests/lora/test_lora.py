import pytest
import torch

from hypersd import lora
from hypersd.digits.data import prompts_for
from hypersd.errors import HypersdError
from hypersd.teachers.digits import DigitsTeacher


def _teacher():
    t = DigitsTeacher.new(seed=4)
    t.unet.requires_grad_(False)
    return t


def test_fresh_lora_leaves_the_teacher_unchanged_and_disable_restores_it():
    t = _teacher()
    x, cond = torch.randn(2, 1, 8, 8), t.encode_prompt(prompts_for([1, 2]))
    with torch.no_grad():
        before = t.eps(x, 500, cond)
        lora.add_lora(t.unet, lora.lora_config(4))
        assert torch.equal(t.eps(x, 500, cond), before)
        for p in lora.adapter_params(t.unet, lora.STUDENT):
            p.add_(0.1)
        assert not torch.allclose(t.eps(x, 500, cond), before)
        with lora.adapters_disabled(t.unet):
            assert torch.allclose(t.eps(x, 500, cond), before)
        assert not torch.allclose(t.eps(x, 500, cond), before)


def test_ema_adapter_switch_keeps_student_trainable():
    t = _teacher()
    lora.add_lora(t.unet, lora.lora_config(4), lora.STUDENT)
    lora.add_lora(t.unet, lora.lora_config(4), lora.EMA)
    t.unet.set_adapter(lora.STUDENT)
    for p in lora.adapter_params(t.unet, lora.EMA):
        p.requires_grad_(False)
    with lora.adapter(t.unet, lora.EMA):
        assert t.unet.active_adapters() == [lora.EMA]
    assert t.unet.active_adapters() == [lora.STUDENT]
    assert all(p.requires_grad for p in lora.adapter_params(t.unet, lora.STUDENT))
    assert not any(p.requires_grad for p in lora.adapter_params(t.unet, lora.EMA))


def test_save_load_round_trip_and_mismatch_errors(tmp_path):
    t = _teacher()
    lora.add_lora(t.unet, lora.lora_config(4, targets="attn"))
    with torch.no_grad():
        for p in lora.adapter_params(t.unet, lora.STUDENT):
            p.normal_()
    path = lora.save_lora(tmp_path / "l.safetensors", t.unet, {"guidance": 1.0})
    x, cond = torch.randn(2, 1, 8, 8), t.encode_prompt(prompts_for([3, 4]))
    with torch.no_grad():
        want = t.eps(x, 300, cond)
        t2 = _teacher()
        meta = lora.load_lora(t2.unet, path)
        assert meta["rank"] == 4 and meta["guidance"] == 1.0
        assert torch.allclose(t2.eps(x, 300, cond), want, atol=1e-6)
    # a state from another rank is listed, key by key, in one message
    t3 = _teacher()
    lora.add_lora(t3.unet, lora.lora_config(8, targets="attn"))
    with pytest.raises(HypersdError, match="wrong shape"):
        lora.set_state(t3.unet, lora.get_state(t.unet))
    with pytest.raises(HypersdError, match="not found"):
        lora.load_lora(t3.unet, tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(HypersdError, match="not a readable"):
        lora.load_lora(t3.unet, tmp_path / "junk.safetensors")


def _randomised(t, name, rank=4, targets="attn", seed=0):
    lora.add_lora(t.unet, lora.lora_config(rank, targets=targets), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_params(t.unet, name):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_merge_equals_both_adapters_at_once_and_scales_the_second():
    t = _teacher()
    _randomised(t, lora.STUDENT, seed=1)
    _randomised(t, lora.FEEDBACK, seed=2)
    x, cond = torch.randn(2, 1, 8, 8), t.encode_prompt(prompts_for([3, 4]))
    with torch.no_grad():
        lora.activate(t.unet, [lora.STUDENT, lora.FEEDBACK])
        both = t.eps(x, 600, cond)
        lora.activate(t.unet, lora.STUDENT)
        alone = t.eps(x, 600, cond)
        a, b = lora.get_state(t.unet, lora.STUDENT), lora.get_state(t.unet, lora.FEEDBACK)
        sa, sb = lora.spec(t.unet, lora.STUDENT), lora.spec(t.unet, lora.FEEDBACK)
        # ratio 0.5 is the feedback LoRA with its B halved, next to the student
        half = {k: v * 0.5 if ".lora_B." in k else v for k, v in b.items()}
        lora.add_lora(t.unet, lora.lora_config(4, targets="attn"), "halved")
        lora.set_state(t.unet, half, "halved")
        lora.activate(t.unet, [lora.STUDENT, "halved"])
        halfway = t.eps(x, 600, cond)
        for ratio, want in ((1.0, both), (0.0, alone), (0.5, halfway)):
            state, spec = lora.merge_states(a, sa, b, sb, ratio)
            assert spec["rank"] == 8
            lora.remove_lora(t.unet, "merged")
            lora.add_lora(t.unet, lora.lora_config(spec["rank"], spec["alpha"], spec["targets"]), "merged")
            lora.set_state(t.unet, state, "merged")
            lora.activate(t.unet, "merged")
            assert torch.allclose(t.eps(x, 600, cond), want, atol=1e-5), ratio


def test_merge_of_different_ranks_is_exact_by_stacking():
    t = _teacher()
    for name, rank, alpha, seed in (("a", 4, 8.0, 1), ("b", 2, 1.0, 2)):  # scales 2 and 0.5
        lora.add_lora(t.unet, lora.lora_config(rank, alpha, targets="all"), name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lora.adapter_params(t.unet, name):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    a, sa = lora.get_state(t.unet, "a"), lora.spec(t.unet, "a")
    b, sb = lora.get_state(t.unet, "b"), lora.spec(t.unet, "b")
    state, spec = lora.merge_states(a, sa, b, sb, 0.5)
    assert spec["rank"] == 6 and spec["alpha"] == 6
    got, da, db = _updates(state, spec), _updates(a, sa), _updates(b, sb)
    assert any(v.dim() == 4 for v in state.values())  # conv LoRAs among them
    assert got.keys() == da.keys() and len(got) > 0
    for k in got:  # each layer's ΔW = 2·B_a·A_a + 0.5·(0.5·B_b·A_b)
        assert torch.allclose(got[k], da[k] + 0.5 * db[k], atol=1e-10), k


def test_merge_refuses_other_targets():
    t = _teacher()
    _randomised(t, "a", rank=4)
    _randomised(t, "c", rank=4, targets="attn-ff")
    a, sa = lora.get_state(t.unet, "a"), lora.spec(t.unet, "a")
    with pytest.raises(HypersdError, match="different targets"):
        lora.merge_states(a, sa, lora.get_state(t.unet, "c"), lora.spec(t.unet, "c"))


def test_activate_trains_only_what_it_is_told():
    t = _teacher()
    lora.add_lora(t.unet, lora.lora_config(4), lora.STUDENT)
    lora.add_lora(t.unet, lora.lora_config(4), lora.FEEDBACK)
    lora.activate(t.unet, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))
    assert not any(p.requires_grad for p in lora.adapter_params(t.unet, lora.STUDENT))
    assert all(p.requires_grad for p in lora.adapter_params(t.unet, lora.FEEDBACK))
    with lora.adapter(t.unet, lora.STUDENT):  # a switch and back keeps both the set and the flags
        assert all(p.requires_grad for p in lora.adapter_params(t.unet, lora.STUDENT))
    assert not any(p.requires_grad for p in lora.adapter_params(t.unet, lora.STUDENT))
    assert t.unet.active_adapters() == [lora.STUDENT, lora.FEEDBACK]


def test_adapters_disabled_keeps_a_frozen_student_frozen():
    """peft's re-enable makes every active adapter trainable; a feedback stage's student must stay
    frozen through the teacher passes between its steps."""
    t = _teacher()
    lora.add_lora(t.unet, lora.lora_config(4), lora.STUDENT)
    lora.add_lora(t.unet, lora.lora_config(4), lora.FEEDBACK)
    lora.activate(t.unet, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))
    with lora.adapters_disabled(t.unet):
        pass
    assert not any(p.requires_grad for p in lora.adapter_params(t.unet, lora.STUDENT))
    assert all(p.requires_grad for p in lora.adapter_params(t.unet, lora.FEEDBACK))
    assert t.unet.active_adapters() == [lora.STUDENT, lora.FEEDBACK]
    with pytest.raises(RuntimeError), lora.adapters_disabled(t.unet):  # restored on the way out of an error too
        raise RuntimeError
    assert not any(p.requires_grad for p in lora.adapter_params(t.unet, lora.STUDENT))


def _switch_state(unet) -> tuple:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    return ([(list(m.active_adapters), m.disable_adapters) for m in layers],
            [(n, p.requires_grad) for n, p in unet.named_parameters()])


def test_adapter_switches_leave_what_peft_s_own_would_without_its_module_walk(monkeypatch):
    """hypersd sets the layers' switch attributes and the flags directly (peft's set_adapter walks
    every adapter's modules: a tenth of a digits CPU step). Each switch must leave exactly the state
    peft's own calls leave, inside the switch and after it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def build():
        t = _teacher()
        for name in (lora.STUDENT, lora.EMA, lora.FEEDBACK):
            lora.add_lora(t.unet, lora.lora_config(4), name)
        return t.unet

    def peft_activate(unet, names, trainable=()):
        unet.set_adapter(names)
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.requires_grad_(any(f".{t}." in n for t in trainable))

    ours, theirs = build(), build()
    lora.activate(theirs, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))  # a feedback stage's state
    peft_activate(theirs, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))
    start = _switch_state(theirs)
    with monkeypatch.context() as m:  # ours never takes peft's slow path
        m.setattr(BaseTunerLayer, "set_adapter", lambda *a, **k: pytest.fail("peft's set_adapter was called"))
        m.setattr(BaseTunerLayer, "enable_adapters", lambda *a, **k: pytest.fail("peft's enable_adapters was called"))
        lora.activate(ours, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))
        assert _switch_state(ours) == start
        with lora.adapter(ours, lora.EMA):
            inside = _switch_state(ours)
        assert _switch_state(ours) == start
        with lora.adapter(ours, [lora.STUDENT, lora.EMA]):
            inside_two = _switch_state(ours)
        with lora.adapters_disabled(ours):
            off = _switch_state(ours)
        assert _switch_state(ours) == start
    theirs.set_adapter(lora.EMA)
    assert inside == _switch_state(theirs)
    theirs.set_adapter([lora.STUDENT, lora.EMA])
    assert inside_two == _switch_state(theirs)
    peft_activate(theirs, [lora.STUDENT, lora.FEEDBACK], trainable=(lora.FEEDBACK,))
    theirs.disable_adapters()
    assert off == _switch_state(theirs)


def test_fused_sampling_matches_and_restores_the_base_weights_exactly():
    t = _teacher()
    _randomised(t, lora.STUDENT, targets="all", seed=3)
    lora.activate(t.unet, lora.STUDENT)
    x, cond = torch.randn(2, 1, 8, 8), t.encode_prompt(prompts_for([5, 6]))
    base = {n: p.detach().clone() for n, p in t.unet.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        want = t.eps(x, 300, cond)
        with lora.fused(t.unet):
            assert torch.allclose(t.eps(x, 300, cond), want, atol=1e-5)
        assert torch.equal(t.eps(x, 300, cond), want)  # adapters live again, on the same weights
        with lora.adapters_disabled(t.unet):
            teacher = t.eps(x, 300, cond)
    assert all(torch.equal(p, base[n]) for n, p in t.unet.named_parameters() if "lora_" not in n)
    assert not torch.allclose(teacher, want)


def _updates(state, spec_):
    """Each layer's update (alpha/r)·B·A as a matrix: out × (in·kh·kw) for a conv LoRA."""
    out = {}
    for k, a in state.items():
        if ".lora_A." in k:
            r, b = a.shape[0], state[k.replace(".lora_A.", ".lora_B.")]
            out[k] = spec_["alpha"] / spec_["rank"] * b.reshape(b.shape[0], r).double() @ a.reshape(r, -1).double()
    return out


def _stacked(t, targets="all"):
    """A rank-8 merge of two random rank-4 LoRAs, over linear and conv layers."""
    _randomised(t, lora.STUDENT, targets=targets, seed=1)
    _randomised(t, lora.FEEDBACK, targets=targets, seed=2)
    return lora.merge_states(lora.get_state(t.unet, lora.STUDENT), lora.spec(t.unet, lora.STUDENT),
                             lora.get_state(t.unet, lora.FEEDBACK), lora.spec(t.unet, lora.FEEDBACK), 0.5)


def test_compress_is_exact_where_the_rank_fits():
    t = _teacher()
    state, spec = _stacked(t)
    assert any(v.dim() == 4 for v in state.values())  # conv LoRAs are in it
    small, small_spec = lora.compress_state(state, spec, 8)  # the stacked rank: nothing to drop
    assert small_spec == {"rank": 8, "alpha": 8, "targets": spec["targets"]}
    want, got = _updates(state, spec), _updates(small, small_spec)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k  # float32 factors
    # and the UNet samples the same with it
    x, cond = torch.randn(2, 1, 8, 8), t.encode_prompt(prompts_for([7, 8]))
    for name, (s, sp) in (("stacked", (state, spec)), ("compressed", (small, small_spec))):
        lora.add_lora(t.unet, lora.lora_config(sp["rank"], sp["alpha"], sp["targets"]), name)
        lora.set_state(t.unet, s, name)
    with torch.no_grad():
        lora.activate(t.unet, "stacked")
        stacked = t.eps(x, 700, cond)
        lora.activate(t.unet, "compressed")
        assert torch.allclose(t.eps(x, 700, cond), stacked, atol=1e-5)


def test_compress_drops_exactly_the_smallest_singular_values():
    t = _teacher()
    state, spec = _stacked(t)
    small, small_spec = lora.compress_state(state, spec, 3)
    assert all(v.shape[0 if ".lora_A." in k else 1] == 3 for k, v in small.items())
    want, got = _updates(state, spec), _updates(small, small_spec)
    for k in want:
        s = torch.linalg.svdvals(want[k])
        assert s[3] > 1e-3  # something is truly dropped
        # Eckart-Young: the best rank-3 error is the discarded singular values, and this is it
        assert torch.allclose((want[k] - got[k]).pow(2).sum(), s[3:].pow(2).sum(), rtol=1e-4), k
        assert torch.allclose(torch.linalg.svdvals(got[k])[:3], s[:3], rtol=1e-4), k
        # each kept singular value splits evenly: B's column and A's row have the same norm
        a, b = small[k], small[k.replace(".lora_A.", ".lora_B.")]
        assert torch.allclose(b.reshape(len(b), 3).norm(dim=0), a.reshape(3, -1).norm(dim=1), rtol=1e-4), k


def test_compress_keeps_a_zero_update_zero_but_trainable():
    t = _teacher()
    lora.add_lora(t.unet, lora.lora_config(4, targets="attn"))  # fresh: B = 0
    state, spec = lora.get_state(t.unet), lora.spec(t.unet, lora.STUDENT)
    small, _ = lora.compress_state(state, spec, 2, torch.Generator().manual_seed(0))
    for k, v in small.items():
        if ".lora_B." in k:
            assert not v.any()
        else:  # A rows as a fresh LoRA's, so B gets gradients
            assert v.abs().sum(1).min() > 0
    with pytest.raises(HypersdError, match="rank must be >= 1"):
        lora.compress_state(state, spec, 0)
