import pytest
import torch
from diffusers import DDIMScheduler, TCDScheduler

from hypersd.core.sampling import guided, initial_noise, sample_prompts, sample_tcd
from hypersd.core.schedule import inference_timesteps
from hypersd.digits.data import prompts_for
from hypersd.teachers.digits import SCHEDULER_CONFIG, DigitsTeacher


@pytest.fixture(scope="module")
def teacher():
    t = DigitsTeacher.new(seed=1)
    t.unet.eval().requires_grad_(False)
    t.text.eval().requires_grad_(False)
    return t


def _diffusers_loop(sched, teacher, cond, x, g, **step_kw):
    """diffusers' loop; the result is the last step's x0 prediction.

    Our last step returns x0 (HYPERSD.md §4); diffusers' TCD and SD-config DDIM then also jump
    to ᾱ_0 = 0.99915 rather than 1, which adds 0.03·ε. Every earlier state is compared exactly,
    since the last x0 depends on all of them.
    """
    for t in sched.timesteps:
        eps = teacher.eps(x, t, cond)
        last_x, a = x, sched.alphas_cumprod[t]
        x = sched.step(eps, t, x, generator=g, **step_kw).prev_sample
    return (last_x - (1 - a).sqrt() * eps) / a.sqrt()


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@torch.no_grad()
def test_eta_zero_is_diffusers_ddim_trailing(teacher, k):
    cond = teacher.encode_prompt(prompts_for([3, 7]))
    x, _ = initial_noise(2, teacher.latent_shape, seed=5)
    ours = sample_tcd(guided(teacher, cond, 1.0), x, inference_timesteps(k), teacher.alphas_cumprod)
    sched = DDIMScheduler(**SCHEDULER_CONFIG, timestep_spacing="trailing", clip_sample=False)
    sched.set_timesteps(k)
    theirs = _diffusers_loop(sched, teacher, cond, x, None)
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@torch.no_grad()
def test_tcd_form_equals_diffusers_tcd_scheduler(teacher, k, eta):
    cond = teacher.encode_prompt(prompts_for([0, 1, 9]))
    x, g = initial_noise(3, teacher.latent_shape, seed=11)
    ours = sample_tcd(guided(teacher, cond, 1.0), x, inference_timesteps(k), teacher.alphas_cumprod, eta=eta, generator=g)
    sched = TCDScheduler(**SCHEDULER_CONFIG, original_inference_steps=40)
    sched.set_timesteps(k)
    _, g2 = initial_noise(3, teacher.latent_shape, seed=11)
    theirs = _diffusers_loop(sched, teacher, cond, x, g2, eta=eta)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_guidance_one_skips_the_unconditional_pass_and_guidance_mixes(teacher):
    cond = teacher.encode_prompt(prompts_for([2]))
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        e_c = teacher.eps(x, 500, cond)
        e_u = teacher.eps(x, 500, teacher.empty_cond(1))
        assert torch.allclose(guided(teacher, cond, 1.0)(x, 500), e_c)
        assert torch.allclose(guided(teacher, cond, 3.0)(x, 500), e_u + 3 * (e_c - e_u), atol=1e-5)


def test_same_seed_same_samples_and_batches_do_not_matter(teacher):
    prompts = prompts_for(range(10)) * 2
    a = sample_prompts(teacher, prompts, 2, guidance=2.0, seed=3, batch_size=7)
    b = sample_prompts(teacher, prompts, 2, guidance=2.0, seed=3, batch_size=20)
    c = sample_prompts(teacher, prompts, 2, guidance=2.0, seed=4)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # random weights: |x| ~ 50
    assert not torch.allclose(a, c)
