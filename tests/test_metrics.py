import numpy as np
import pytest
import torch

from hypersd.digits import data
from hypersd.evaluation import DigitsBench, markdown_table
from hypersd.metrics import frechet_distance, summarize
from hypersd.teachers.digits import DigitsTeacher


def test_frechet_distance_of_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(1, 2, (20000, 3))
    # ‖Δμ‖² + Σ (1 + 4 − 2·2) = 3 + 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


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
