import pytest
import torch

from hypersd import lora
from hypersd.core.schedule import CLEAN, Segments, SolverGrid
from hypersd.core.solver import ddim_jump
from hypersd.digits.data import prompts_for
from hypersd.errors import HypersdError
from hypersd.losses.tscd import ConsistencyConfig, ConsistencyStep, distance, draw_t_end
from hypersd.teachers.digits import DigitsTeacher


def test_t_end_lies_in_the_segment_between_boundary_and_next_grid_point():
    seg = Segments(4, SolverGrid(1000, 40))
    t_n = torch.tensor([999, 724, 224, 24] * 500)
    t_prev = seg.grid.step_down(t_n)
    t_b = seg.lower_boundary(t_n)
    t_end = draw_t_end(t_b, t_prev, "segment", torch.Generator().manual_seed(0))
    assert (t_end >= t_b).all() and (t_end <= t_prev).all()
    # both ends are reachable, the clean end included in the last segment
    for lo, hi in [(749, 974), (499, 699), (CLEAN, 199), (CLEAN, CLEAN)]:
        sel = t_end[(t_b == lo) & (t_prev == hi)]
        assert sel.min() == lo and sel.max() == hi
    assert torch.equal(draw_t_end(t_b, t_prev, "boundary"), t_b)
    mixed = draw_t_end(t_b, t_prev, "segment", torch.Generator().manual_seed(1), boundary_prob=0.5)
    share = (mixed[t_n == 999] == 749).float().mean().item()
    assert 0.45 < share < 0.6  # half sent to t_b, plus the uniform draw's own 1/226
    assert (mixed >= t_b).all() and (mixed <= t_prev).all()


def test_pseudo_huber_and_mse_by_hand():
    a, b = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.1)
    assert distance(a, b, "mse", 0.03).item() == pytest.approx(0.01)
    assert distance(a, b, "huber", 0.03).item() == pytest.approx((0.01 + 0.0009) ** 0.5 - 0.03)
    c = torch.tensor([0.1, -0.1, 0.4, 0.0]).view(1, 1, 2, 2)
    assert distance(a, c, "l1", 0.03).item() == pytest.approx(0.15)  # (0.1 + 0.1 + 0.4 + 0) / 4
    x = torch.tensor([0.01, 1.0]).view(1, 1, 1, 2).requires_grad_()
    distance(x, torch.zeros(1, 1, 1, 2), "l1", 0.03).sum().backward()
    assert x.grad.flatten().tolist() == pytest.approx([0.5, 0.5])  # the small error pulled as hard as the large


@pytest.fixture()
def student_teacher():
    t = DigitsTeacher.new(seed=2)
    t.unet.requires_grad_(False)
    t.text.requires_grad_(False)
    cfg = lora.lora_config(4)
    lora.add_lora(t.unet, cfg, lora.STUDENT)
    lora.add_lora(t.unet, cfg, lora.EMA)
    t.unet.set_adapter(lora.STUDENT)
    return t


def _batch(t, n=6):
    cond = t.encode_prompt(prompts_for(range(n)))
    return torch.randn(n, 1, 8, 8).clamp(-1, 1), cond, t.empty_cond(n)


def test_loss_is_zero_when_student_and_target_agree(student_teacher):
    """A fresh LoRA is zero, so the student is the teacher; from the lowest grid point with ω = 1
    both the student's jump and the teacher step land on the same x0."""
    t = student_teacher
    step = ConsistencyStep(t, ConsistencyConfig(segments=1, end="boundary", guidance=(1.0, 1.0), solver_steps=1000))
    z, cond, uncond = _batch(t)
    step.grid.sample = lambda n, g=None: torch.zeros(n, dtype=torch.long)  # t_n = 0: one step to clean
    pred, tgt, t_end = step(z, cond, uncond, torch.Generator().manual_seed(0))
    assert (t_end == CLEAN).all()
    assert step.loss(pred, tgt).item() == pytest.approx(0.0, abs=1e-10)


def test_step_matches_the_equations_by_hand(student_teacher):
    t = student_teacher
    with torch.no_grad():  # give the student and EMA different non-zero LoRAs
        for p in lora.adapter_params(t.unet, lora.STUDENT):
            p.add_(0.05 * torch.randn_like(p))
        for p in lora.adapter_params(t.unet, lora.EMA):
            p.add_(0.05 * torch.randn_like(p))
    cfgc = ConsistencyConfig(segments=4, end="segment", guidance=(2.0, 2.0))
    step = ConsistencyStep(t, cfgc)
    z, cond, uncond = _batch(t, 4)
    g = torch.Generator().manual_seed(3)
    pred, tgt, t_end = step(z, cond, uncond, g)
    # replay the same draws
    g = torch.Generator().manual_seed(3)
    t_n = step.grid.sample(4, g)
    t_prev = step.grid.step_down(t_n)
    t_end2 = draw_t_end(step.segments.lower_boundary(t_n), t_prev, "segment", g)
    noise = torch.randn(z.shape, generator=g)
    acp = t.alphas_cumprod
    x_t = acp[t_n].sqrt().view(-1, 1, 1, 1) * z + (1 - acp[t_n]).sqrt().view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        with lora.adapters_disabled(t.unet):
            e_c, e_u = t.eps(x_t, t_n, cond), t.eps(x_t, t_n, uncond)
        x_hat = ddim_jump(x_t, e_u + 2.0 * (e_c - e_u), t_n, t_prev, acp)
        with lora.adapter(t.unet, lora.EMA):
            want_tgt = ddim_jump(x_hat, t.eps(x_hat, t_prev.clamp(min=0), cond), t_prev, t_end2, acp)
        keep = ((t_prev == t_end2) | (t_prev == CLEAN)).view(-1, 1, 1, 1)
        want_tgt = torch.where(keep, x_hat, want_tgt)
        want_pred = ddim_jump(x_t, t.eps(x_t, t_n, cond), t_n, t_end2, acp)
    assert torch.equal(t_end, t_end2)
    assert torch.allclose(tgt, want_tgt, atol=1e-5) and torch.allclose(pred, want_pred, atol=1e-5)
    assert pred.requires_grad and not tgt.requires_grad
    assert t.unet.active_adapters() == [lora.STUDENT]


def test_off_grid_configuration_is_refused(student_teacher):
    with pytest.raises(HypersdError, match="not on the N=50"):
        ConsistencyStep(student_teacher, ConsistencyConfig(segments=4, solver_steps=50))


@pytest.mark.parametrize("stride", [1, 2, 40])  # every grid point, every other one, one jump
def test_solve_below_targets_the_teachers_own_ddim_down_to_t_end(student_teacher, stride):
    t = student_teacher
    with torch.no_grad():  # an EMA target far from the teacher: the solved rows must not read it
        for p in lora.adapter_params(t.unet, lora.EMA):
            p.add_(0.2 * torch.randn_like(p))
    step = ConsistencyStep(t, ConsistencyConfig(segments=1, guidance=(2.0, 2.0), solve_below=499,
                                                solve_stride=stride))
    z, cond, uncond = _batch(t, 8)
    g = torch.Generator().manual_seed(5)
    step.grid.sample = lambda n, g=None: torch.tensor([24, 49, 124, 249, 499, 524, 749, 999])
    pred, tgt, t_end = step(z, cond, uncond, g)
    plain = ConsistencyStep(t, ConsistencyConfig(segments=1, guidance=(2.0, 2.0)))
    plain.grid.sample = step.grid.sample
    _, tgt_plain, _ = plain(z, cond, uncond, torch.Generator().manual_seed(5))
    # replay the draws, then the teacher's DDIM one row at a time, grid point by grid point
    g = torch.Generator().manual_seed(5)
    t_n = step.grid.sample(8)
    t_prev = step.grid.step_down(t_n)
    assert torch.equal(t_end, draw_t_end(step.segments.lower_boundary(t_n), t_prev, "segment", g))
    noise = torch.randn(z.shape, generator=g)
    acp = t.alphas_cumprod
    x_t = acp[t_n].sqrt().view(-1, 1, 1, 1) * z + (1 - acp[t_n]).sqrt().view(-1, 1, 1, 1) * noise

    def teacher_eps(x, s, i):
        e_c, e_u = t.eps(x, s, cond[i:i + 1]), t.eps(x, s, uncond[i:i + 1])
        return e_u + 2.0 * (e_c - e_u)

    with torch.no_grad(), lora.adapters_disabled(t.unet):
        calls = 0
        for i in range(5):  # t_n <= 499: solved by the teacher
            s, x = int(t_n[i]), x_t[i:i + 1]
            first = True  # t_n -> t_{n-1} is one grid point, whatever the stride
            while s > int(t_end[i]):
                nxt = torch.tensor(s)
                for _ in range(1 if first else stride):
                    nxt = step.grid.step_down(nxt)
                nxt, first = max(int(nxt), int(t_end[i])), False
                x = ddim_jump(x, teacher_eps(x, torch.tensor([s]), i), torch.tensor([s]), torch.tensor([nxt]), acp)
                s, calls = nxt, calls + 1
            assert torch.allclose(tgt[i:i + 1], x, atol=1e-5), i
    assert (t_end[:5] < t_prev[:5]).sum() >= 3  # most solved rows take more than the first step
    if stride == 40:  # one jump: the first step, then at most one teacher call a row
        assert calls == 5 + int((t_end[:5] < t_prev[:5]).sum())
    # above solve_below: the EMA target, as without it (the EMA ran on fewer rows: the last bits)
    assert torch.allclose(tgt[5:], tgt_plain[5:], atol=1e-5)
    assert not torch.allclose(tgt[:5], tgt_plain[:5], atol=1e-3)


@pytest.mark.parametrize("lockstep", [False, True])
def test_the_ema_runs_only_on_rows_it_targets_unless_in_lockstep(student_teacher, monkeypatch, lockstep):
    """One-grid-step segments put every row at t_end after the teacher's step: no EMA call is needed,
    and none is made, except in lockstep (a sharded base: every process makes the same calls)."""
    step = ConsistencyStep(student_teacher, ConsistencyConfig(segments=40, end="boundary"),
                           lockstep=(lambda n: n) if lockstep else None)
    rows = []
    ema = step.roles.ema
    monkeypatch.setattr(step.roles, "ema", lambda x, t, c: rows.append(len(x)) or ema(x, t, c))
    z, cond, uncond = _batch(student_teacher, 6)
    _, tgt, t_end = step(z, cond, uncond, torch.Generator().manual_seed(3))
    assert rows == ([6] if lockstep else [])
    plain = ConsistencyStep(student_teacher, ConsistencyConfig(segments=40, end="boundary"))
    _, tgt_plain, _ = plain(z, cond, uncond, torch.Generator().manual_seed(3))
    assert torch.equal(tgt, tgt_plain)  # the rows at t_end keep the teacher's step either way


@pytest.mark.parametrize("rows", ["some solved", "none solved"])
@pytest.mark.parametrize("other", [0, 3])  # another process needs no more solve calls, or 3 more
def test_a_lockstep_solve_pads_its_teacher_calls_to_the_most_any_process_makes(student_teacher, rows, other):
    """On a sharded base every teacher call all-gathers: a process whose rows need fewer solve
    calls than another's (or none) makes dropped calls until the counts agree, and its targets are
    the unpadded solve's."""
    cfg = ConsistencyConfig(segments=1, guidance=(2.0, 2.0), solve_below=499, solve_stride=2)
    draws = [24, 49, 124, 249, 499, 524, 749, 999] if rows == "some solved" else [524, 749, 999, 999]
    asked, calls = [], {}
    z, cond, uncond = _batch(student_teacher, len(draws))
    tgts = {}
    for name, lockstep in (("plain", None), ("lockstep", lambda n: asked.append(n) or n + other)):
        step = ConsistencyStep(student_teacher, cfg, lockstep=lockstep)
        step.grid.sample = lambda n, g=None: torch.tensor(draws)
        calls[name], teacher = 0, step._teacher

        def counted(*args, teacher=teacher, name=name):
            calls[name] += 1
            return teacher(*args)

        step._teacher = counted
        _, tgts[name], _ = step(z, cond, uncond, torch.Generator().manual_seed(5))
    assert torch.allclose(tgts["lockstep"], tgts["plain"], atol=1e-5)  # the EMA ran on every row: the last bits
    solve = calls["plain"] - 1  # the teacher's first step, then the solve's calls
    assert asked == [solve] and (solve > 0) == (rows == "some solved")
    assert calls["lockstep"] == calls["plain"] + other
