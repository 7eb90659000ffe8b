"""An SD2-style v-prediction teacher end to end: a tiny SD1.5-architecture UNet whose scheduler config
says ``prediction_type: v_prediction``, sampled, distilled and generated from, against diffusers."""

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, TCDScheduler
from sd_tiny import save_tiny

from hypersd.cli import main
from hypersd.core import DDPMSchedule
from hypersd.core.sampling import sample_prompts, sample_tcd
from hypersd.inference.generator import Generator
from hypersd.inference.schedulers import make_scheduler
from hypersd.losses.dmd import score_x0
from hypersd.losses.feedback import perceptual_loss, sample_until
from hypersd.teachers import load_teacher

V = "v_prediction"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny("sd15", tmp_path_factory.mktemp("v") / "sd15", prediction_type=V))


@pytest.fixture(scope="module")
def teacher(model):
    return load_teacher("sd15", model)


def _unet_fn(teacher, cond):
    """The network as diffusers' pipelines call it: the raw UNet at the scheduler's timestep."""
    return lambda x, t: teacher.unet(x, t, encoder_hidden_states=cond.hidden).sample


def _run(scheduler, fn, x, **step_kw):
    """diffusers' denoising loop; also the latents each step is called on."""
    seen = []
    for t in scheduler.timesteps:
        seen.append(x)
        x = scheduler.step(fn(x, t), t, x, **step_kw).prev_sample
    return x, seen


def test_the_teacher_loads_as_v_and_its_output_is_the_unets(teacher):
    assert teacher.schedule.prediction_type == V
    cond = teacher.encode_prompt(["a cat"])
    x = torch.randn(1, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(teacher.eps(x, 499, cond), _unet_fn(teacher, cond)(x, torch.tensor([499])))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_sampler_equals_diffusers_ddim_and_tcd_with_the_same_v_model(teacher, k):
    """sample_tcd at eta 0 on the trailing boundaries is diffusers' DDIM (trailing, last step to
    ᾱ = 1) and TCD at eta 0: TCD's every step; its last one stops at ᾱ_0 = 0.99915, where
    hypersd's (and generate's TCD) returns x0."""
    cond = teacher.encode_prompt(["a red house"])
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = cond.repeat(2)
    sched = teacher.schedule
    timesteps = sched.inference_timesteps(k)
    seen = []
    fn = lambda x_, t: seen.append(x_) or teacher.eps(x_, t, cond)  # noqa: E731
    with torch.no_grad():
        ours = sample_tcd(fn, x, timesteps, sched)
        ddim = DDIMScheduler.from_config(teacher.scheduler_config, timestep_spacing="trailing",
                                         set_alpha_to_one=True, clip_sample=False)
        ddim.set_timesteps(k)
        assert ddim.timesteps.tolist() == timesteps
        ref, _ = _run(ddim, _unet_fn(teacher, cond), x, eta=0.0)
        tcd = TCDScheduler.from_config(teacher.scheduler_config)
        tcd.set_timesteps(timesteps=timesteps)
        _, tcd_seen = _run(tcd, _unet_fn(teacher, cond), x, eta=0.0)
        hyper_tcd = make_scheduler("tcd", teacher.scheduler_config)
        hyper_tcd.set_timesteps(timesteps=timesteps)
        end, _ = _run(hyper_tcd, _unet_fn(teacher, cond), x, eta=0.0)
    assert ours.std() > 0.1
    assert (ours - ref).abs().max() < 1e-5
    assert max((a - b).abs().max() for a, b in zip(seen, tcd_seen)) < 1e-5
    assert (ours - end).abs().max() < 1e-5
    # read as ε, the same network would give another image: the reading is the schedule's
    as_eps = sample_tcd(lambda x_, t: teacher.eps(x_, t, cond), x, timesteps, DDPMSchedule(teacher.alphas_cumprod))
    assert (as_eps - ours).abs().max() > 0.1


def _point_mass_v(sched, x0):
    """The exact v-model of data that is the single point x0: v = α·ε − σ·x0 with ε = (x_t − α·x0)/σ."""
    def fn(x_t, t):
        a = sched.alpha(torch.as_tensor(t)).reshape(-1, 1, 1, 1)
        s = sched.sigma(torch.as_tensor(t)).reshape(-1, 1, 1, 1)
        return a * (x_t - a * x0) / s - s * x0
    return fn


def test_dmd_and_feedback_read_a_v_model_by_the_schedule(teacher):
    """The exact v-model of one point gives that point back from every x_t: in DMD's score, in the
    feedback sampler and in the perceptual loss, which read the output through the schedule."""
    sched = teacher.schedule
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise, fn = torch.randn(3, 4, 8, 8, generator=g), _point_mass_v(sched, x0)
    t = torch.tensor([900, 400, 30])
    assert (score_x0(fn, x0, noise, t, sched) - x0).abs().max() < 1e-4
    assert (score_x0(fn, x0, noise, t, DDPMSchedule(teacher.alphas_cumprod)) - x0).abs().max() > 0.1
    got = sample_until(fn, noise, sched.inference_timesteps(4), 2, sched)
    assert (got - x0).abs().max() < 1e-4
    assert perceptual_loss(torch.nn.Identity(), fn, x0, noise, t, sched, lambda z: z).item() < 1e-8


def test_distill_tscd_and_dmd_on_a_v_teacher(model, tmp_path):
    """A TSCD and a DMD stage train on the v-model from its cache; the LoRA learns."""
    from test_imagedata import write_folder

    from hypersd import lora
    from hypersd.data.cache import build_cache

    write_folder(tmp_path / "images", n_good=4)
    build_cache("sd15", model, str(tmp_path / "images"), tmp_path / "cache", progress=False)
    recipe = {"backbone": "sd15", "teacher": model, "data": str(tmp_path / "cache"), "resolution": 16,
              "lora_rank": 4, "grid_every_stage": False, "eval_steps": [1, 2], "checkpoint_every": 100,
              "stage_defaults": {"batch": 2, "steps": 2},
              "stages": [{"name": "t2", "segments": 2},
                         {"name": "d", "kind": "dmd", "fake_warmup": 1, "fake_updates": 1, "reg_pool": 2,
                          "reg_steps": 2, "reg_batch": 1}]}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    state, meta = lora.read_lora(tmp_path / "run" / "lora.safetensors")
    assert meta["backbone"] == "sd15"
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)


@pytest.mark.parametrize("scheduler,eta,k", [("ddim", 0.0, 2), ("tcd", 0.0, 4), ("tcd", 0.3, 4)])
def test_generate_gives_hypersds_images_for_a_v_model(model, teacher, scheduler, eta, k):
    gen = Generator(model, steps=k, scheduler=scheduler, eta=eta, guidance=3.0, device="cpu")
    prompts, seeds = ["a cat", "a red house"], [5, 9]
    images = gen.images(prompts, seeds)
    with torch.no_grad():
        ref = torch.cat([teacher.decode(sample_prompts(teacher, [p], k, guidance=3.0, eta=eta, seed=s))
                         for p, s in zip(prompts, seeds)])
    assert images.std() > 0.05
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=0)
