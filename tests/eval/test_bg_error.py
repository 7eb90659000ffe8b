"""benchmarks/bg_error.py: the split of a background error into bias and noise-driven parts."""

import torch
from bench_scripts import bench_module


def test_a_bias_and_noise_driven_specks_are_told_apart():
    split, g = bench_module("bg_error").split, torch.Generator().manual_seed(0)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, 0] = True  # the left column is "background"
    labels = torch.arange(2).repeat_interleave(500)
    noise = torch.randn(1000, 1, 8, 8, generator=g)
    black = -torch.ones(1000, 1, 8, 8)

    biased = split(black + 0.1, noise, labels, mask)  # every background pixel 0.1 above black
    assert abs(biased["raw_mean"] - 0.1) < 1e-6 and abs(biased["raw_rms"] - 0.1) < 1e-6
    assert biased["within_prompt_std"] < 1e-6 and abs(biased["bg"] - 0.05) < 1e-6

    leaked = split(black + 0.2 * noise, noise, labels, mask)  # input noise left uncancelled
    assert abs(leaked["raw_mean"]) < 0.02 and leaked["corr_noise"] > 0.99
    assert leaked["within_prompt_std"] > 0.03  # varies with the noise for a fixed prompt
    # shown above 0.05 is raw above 0.1, noise above 0.5: P = 0.31; the clamp hides the lower half
    assert 0.28 < leaked["above_0.05"] < 0.34 and abs(leaked["bg"] - 0.2 * 0.3989 / 2) < 0.005


def test_the_rms_splits_into_a_per_prompt_grey_and_an_error_over_the_noise():
    split, g = bench_module("bg_error").split, torch.Generator().manual_seed(1)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, 0] = True
    labels = torch.arange(2).repeat_interleave(500)
    noise = torch.randn(1000, 1, 8, 8, generator=g)
    grey = torch.where(labels == 0, 0.3, -0.1).view(-1, 1, 1, 1)  # each prompt its own fixed offset
    r = split(-1 + grey + 0.2 * noise, noise, labels, mask)
    assert abs(r["systematic_rms"] - ((0.3 ** 2 + 0.1 ** 2) / 2) ** 0.5) < 0.02
    assert abs(r["noise_rms"] - 0.2) < 0.01
    assert abs(r["raw_rms"] ** 2 - r["systematic_rms"] ** 2 - r["noise_rms"] ** 2) < 1e-4
    fixed = split(-1 + grey.expand(-1, 1, 8, 8), noise, labels, mask)  # no noise-driven part
    assert fixed["noise_rms"] < 1e-6
