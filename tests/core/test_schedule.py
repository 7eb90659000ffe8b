import pytest
import torch
from diffusers import DDIMScheduler, TCDScheduler

from hypersd.core.schedule import (
    CLEAN,
    Segments,
    SolverGrid,
    alpha_bar,
    inference_timesteps,
)
from hypersd.errors import HypersdError

SD_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_inference_timesteps_match_diffusers_ddim_trailing_and_tcd(k):
    ddim = DDIMScheduler(**SD_SCHED, timestep_spacing="trailing")
    ddim.set_timesteps(k)
    tcd = TCDScheduler(**SD_SCHED, original_inference_steps=40)
    tcd.set_timesteps(k)
    ours = inference_timesteps(k)
    assert ours == ddim.timesteps.tolist()
    assert ours == tcd.timesteps.tolist()


def test_four_step_boundaries_and_grid():
    assert inference_timesteps(4) == [999, 749, 499, 249]
    grid = SolverGrid(1000, 40)
    assert grid.points[:3].tolist() == [999, 974, 949] and grid.points[-1].item() == 24


def test_step_down_reaches_clean_below_lowest_point():
    grid = SolverGrid(1000, 40)
    assert grid.step_down(torch.tensor([999, 49, 24])).tolist() == [974, 24, CLEAN]


def test_segment_lower_boundaries():
    seg = Segments(4, SolverGrid(1000, 40))
    t = torch.tensor([999, 974, 749, 724, 499, 274, 249, 24])
    assert seg.lower_boundary(t).tolist() == [749, 749, 499, 499, 249, 249, CLEAN, CLEAN]
    one = Segments(1, SolverGrid(1000, 40))
    assert one.lower_boundary(torch.tensor([999, 24])).tolist() == [CLEAN, CLEAN]


def test_off_grid_boundaries_are_refused_with_the_fix():
    with pytest.raises(HypersdError, match="not on the N=50 solver grid"):
        Segments(4, SolverGrid(1000, 50))
    Segments(2, SolverGrid(1000, 50))  # 999 and 499 are on the 50-point grid


def test_step_counts_that_do_not_divide_T_are_refused():
    with pytest.raises(HypersdError, match="do not divide"):
        inference_timesteps(3)


def test_alpha_bar_reads_the_schedule_and_clean_is_one():
    acp = DDIMScheduler(**SD_SCHED).alphas_cumprod.float()
    assert alpha_bar(acp, torch.tensor([CLEAN, 0, 999])).tolist() == pytest.approx([1.0, acp[0].item(), acp[999].item()])


def test_a_dedicated_one_step_generator_samples_at_its_own_timestep():
    from hypersd.core.schedule import inference_timesteps

    assert inference_timesteps(1, 1000, one_step_t=800) == [800]
    assert inference_timesteps(4, 1000, one_step_t=800) == [999, 749, 499, 249]  # only k = 1 changes
    assert inference_timesteps(1, 1000) == [999]
