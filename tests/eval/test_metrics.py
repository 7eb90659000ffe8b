import numpy as np
import pytest
import torch

from hypersd.digits import data
from hypersd.eval.digits import DigitsBench, markdown_table, pick_eta, reference_row
from hypersd.eval.metrics import DISTANCES, beats, multiples, summarize
from hypersd.teachers.digits import DigitsTeacher


def test_summarize_mean_and_spread():
    s = summarize([{"fd": 1.0}, {"fd": 3.0}])
    assert s["fd"]["mean"] == 2.0 and s["fd"]["std"] == pytest.approx(np.sqrt(2)) and s["fd"]["n_seeds"] == 2


def test_bench_scores_real_digits_as_perfect_against_themselves(random_teacher_file):
    teacher = DigitsTeacher.load(random_teacher_file)
    bench = DigitsBench(teacher, n=40, seeds=(0, 1), progress=False)
    x_te, y_te = data.load("test")
    bench._references = {0: x_te[:40], 1: x_te[:40]}  # pretend the teacher drew the test digits
    bench.labels = y_te[:40]
    s = bench.score(lambda prompts, seed: x_te[:40])
    assert s["traj_mse"]["mean"] == 0.0 and s["acc"]["mean"] > 0.9
    noise = bench.score(lambda prompts, seed: torch.rand(40, 1, 8, 8) * 2 - 1)
    assert noise["fd"]["mean"] > 5 * s["fd"]["mean"] and noise["acc"]["mean"] < 0.5
    md = markdown_table([{"method": "x", "steps": 4, "eta": 0.0, **s}], "t")
    assert "| x | 4 | 0 |" in md and md.rstrip().endswith("| – |")


def test_teacher_rows_sample_the_teacher_even_with_a_lora_on(random_teacher_file):
    from hypersd import lora

    plain = DigitsTeacher.load(random_teacher_file)
    with_lora = DigitsTeacher.load(random_teacher_file)
    with_lora.unet.requires_grad_(False)
    lora.add_lora(with_lora.unet, lora.lora_config(4))
    with torch.no_grad():
        for p in lora.adapter_params(with_lora.unet, lora.STUDENT):
            p.add_(0.2)
    a = DigitsBench(plain, n=10, seeds=(0,), progress=False).teacher_sampler(2)(data.prompts_for(range(10)), 0)
    b = DigitsBench(with_lora, n=10, seeds=(0,), progress=False).teacher_sampler(2)(data.prompts_for(range(10)), 0)
    assert torch.allclose(a, b, atol=1e-5)


def _speckled(x, share=0.3, amp=0.2, seed=0):
    """Faint grey specks on a share of the black background: the few-step student's defect."""
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(x.shape, generator=g) < share
    return torch.where((x <= -1) & hit, x + amp * torch.randn(x.shape, generator=g).abs(), x)


def test_pixel_judges_see_speckle_the_cnn_fd_is_blind_to(random_teacher_file):
    teacher = DigitsTeacher.load(random_teacher_file)
    bench = DigitsBench(teacher, n=1000, seeds=(0,), progress=False)
    x, y = data.load("train")
    x, bench.labels = x[:1000], y[:1000]
    bench._references = {0: x}
    clean = bench.score(lambda prompts, seed: x)
    noisy = bench.score(lambda prompts, seed: _speckled(x))
    ratio = {m: noisy[m]["mean"] / clean[m]["mean"] for m in DISTANCES}
    assert 0.9 < ratio["fd"] < 1.1  # the CNN barely moves
    assert ratio["bg_noise"] > 4 and ratio["pix_fd"] > 1.25
    assert beats(clean, noisy) == (False, ["fd"])  # one judge is not enough to call it better


def test_tables_report_every_judge_as_a_multiple_of_the_teacher_40_steps():
    row = lambda fd, pix, bg: {m: {"mean": v, "std": 0.1 * v, "n_seeds": 3}  # noqa: E731
                               for m, v in zip(("fd", "pix_fd", "bg_noise", "acc", "traj_mse", "reward"),
                                               (fd, pix, bg, 0.99, 0.01, -0.1))}
    rows = [{"method": "teacher DDIM", "steps": 40, "eta": 0.0, **row(15.0, 0.5, 0.01)},
            {"method": "distilled LoRA", "steps": 1, "eta": 0.0, **row(30.0, 2.0, 0.05)}]
    md = markdown_table(rows, "t")
    assert "| pix_fd | bg_noise |" in md
    assert "30.00 ± 3.00 (2.00x)" in md and "2.000 ± 0.200 (4.00x)" in md and "0.0500 ± 0.0050 (5.00x)" in md
    assert md.count("(1.00x)") == 3
    assert multiples(rows[1], rows[0]) == pytest.approx({"fd": 2.0, "pix_fd": 4.0, "bg_noise": 5.0})


def test_eta_pick_weighs_every_judge_not_the_cnn_fd_alone():
    ref = {"fd": {"mean": 10.0}, "pix_fd": {"mean": 1.0}, "bg_noise": {"mean": 0.01}}
    scored = {0.0: {"fd": {"mean": 9.0}, "pix_fd": {"mean": 2.0}, "bg_noise": {"mean": 0.05}},
              0.3: {"fd": {"mean": 10.0}, "pix_fd": {"mean": 1.1}, "bg_noise": {"mean": 0.012}}}
    assert pick_eta(scored, ref) == 0.3  # eta 0 has the lower fd, but five times the noise


def test_a_flow_teachers_rows_are_named_for_its_euler_sampler_and_still_are_the_reference():
    from hypersd.core.noise import DDPMSchedule, FlowSchedule
    from hypersd.eval.digits import teacher_method

    flow, ddpm = (type("T", (), {"schedule": s})() for s in (FlowSchedule(), DDPMSchedule(torch.linspace(0.99, 0.01, 10))))
    assert (teacher_method(flow), teacher_method(ddpm)) == ("teacher Euler", "teacher DDIM")
    row = {m: {"mean": 1.0, "std": 0.0, "n_seeds": 1} for m in ("fd", "pix_fd", "bg_noise")}
    rows = [{"method": "teacher Euler", "steps": 40, "eta": 0.0, **row}]
    assert reference_row(rows) is rows[0] and "(teacher Euler)" in markdown_table(rows, "t")
