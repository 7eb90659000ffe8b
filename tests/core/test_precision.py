"""Solver arithmetic in float32 whatever the network's dtype: only the UNet runs in bf16.

The SD tests use a tiny UNet whose output layer is a constant (zero weights, a bias that bf16
holds exactly): its ε is then the same in bf16 and in float32, the network has no bf16 error of
its own, and any difference between a bf16 run and a float32 run is the arithmetic around it.
"""

import pytest
import torch
from sd_tiny import tiny_pipeline
from test_imagedata import image_bytes, write_folder

from hypersd.core.sampling import sample_prompts, sample_tcd
from hypersd.core.schedule import CLEAN
from hypersd.core.solver import add_noise, cfg, ddim_jump
from hypersd.data.cache import CachedData, build_cache
from hypersd.teachers import load_teacher
from hypersd.train.recipe import from_dict
from hypersd.train.stages import stage_run
from hypersd.train.trainer import Distiller

ACP = torch.linspace(0.9991, 0.0047, 1000)  # about SD's ᾱ, from t = 0 to 999
EPS_BIAS = [0.5, -1.25, 0.75, 2.0]  # the constant ε per channel; bf16 holds each exactly


def _rms(a, b) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def test_the_999_to_clean_round_trip_of_bf16_latents_is_float32_accurate():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 4, 32, 32, generator=g).bfloat16()  # as a bf16 cache would hand them over
    noise = torch.randn(z.shape, generator=g).bfloat16()  # and an ε from a bf16 network
    t = torch.full((64,), 999)
    x_t = add_noise(z, noise, t, ACP)
    x0 = ddim_jump(x_t, noise, t, torch.full((64,), CLEAN), ACP)
    assert x_t.dtype == x0.dtype == torch.float32
    assert _rms(x0, z) < 1e-5  # bf16 arithmetic: about 0.025


def test_guidance_mixes_bf16_predictions_in_float32():
    g = torch.Generator().manual_seed(1)
    eps_c, eps_u = (torch.randn(8, 4, 16, 16, generator=g).bfloat16() for _ in range(2))
    w = torch.linspace(1.0, 9.0, 8)
    want = eps_u.double() + w.double().view(-1, 1, 1, 1) * (eps_c.double() - eps_u.double())
    for mix in (cfg(eps_c, eps_u, w), cfg(eps_c, eps_u, 7.5)):
        assert mix.dtype == torch.float32
    assert _rms(cfg(eps_c, eps_u, w), want) < 1e-5  # bf16: about 1e-2


def test_tcd_sampling_of_bf16_noise_computes_and_renoises_in_float32():
    x_T = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    eps = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3)).bfloat16()

    def run(x):  # a network with a fixed answer: the same ε in either precision
        return sample_tcd(lambda x, t: eps, x, [999, 749, 499, 249], ACP, eta=0.3,
                          generator=torch.Generator().manual_seed(4))

    out, want = run(x_T), run(x_T.double())
    assert out.dtype == torch.float32
    assert _rms(out, want) < 1e-5


# -- a tiny SD1.5 whose network has no bf16 error ------------------------------------------------
@pytest.fixture(scope="module")
def constant_sd(tmp_path_factory):
    """(model folder, cache folder) of a tiny SD1.5 with a constant ε."""
    root = tmp_path_factory.mktemp("precision")
    pipe = tiny_pipeline("sd15")
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.copy_(torch.tensor(EPS_BIAS))
    pipe.save_pretrained(root / "model")
    write_folder(root / "images", n_good=4)
    model = str(root / "model")
    build_cache("sd15", model, str(root / "images"), root / "cache", teacher=load_teacher("sd15", model),
                progress=False)
    return model, root / "cache"


def _distiller(constant_sd, precision, tmp_path) -> Distiller:
    model, cache = constant_sd
    recipe = from_dict({
        "backbone": "sd15", "teacher": model, "data": str(cache), "resolution": 16, "device": "cpu",
        "mixed_precision": precision, "lora_rank": 4, "grid_every_stage": False, "eval_steps": [1],
        "stages": [{"name": "t", "segments": 2, "batch": 4, "steps": 1},
                   {"name": "d", "kind": "dmd", "fake_warmup": 0, "reg_pool": 3, "reg_steps": 2, "steps": 1}]})
    return Distiller(recipe, tmp_path / precision, progress=False)


@pytest.fixture(scope="module")
def runs(constant_sd, tmp_path_factory):
    """The float32 and the bf16 Distiller of the same recipe, on the constant-ε model."""
    tmp = tmp_path_factory.mktemp("runs")
    return {p: _distiller(constant_sd, p, tmp) for p in ("no", "bf16")}


def _tscd_step(d: Distiller):
    run = stage_run(d, d.recipe.stages[0])
    run.enter(fresh=True)
    z, _, cond = d.batch(4, torch.Generator().manual_seed(5))
    with d.rt.autocast():
        return z, *run.step(z, cond, cond.unconditional(d.uncond_row), torch.Generator().manual_seed(6))


def test_bf16_training_step_gives_the_float32_targets(runs):
    assert runs["bf16"].teacher.dtype == torch.bfloat16 and runs["no"].teacher.dtype == torch.float32
    z16, pred16, tgt16, t_end16 = _tscd_step(runs["bf16"])
    z32, pred32, tgt32, t_end32 = _tscd_step(runs["no"])
    assert z16.dtype == torch.float32  # the cache hands latents over as it stored them, not in bf16
    torch.testing.assert_close(z16, z32, rtol=0, atol=0)
    assert torch.equal(t_end16, t_end32)
    for got, want in ((pred16, pred32), (tgt16, tgt32)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # bf16 arithmetic: off by ~1e-2


def test_bf16_dmd_pool_and_samples_are_the_float32_ones(runs):
    pools = {}
    for p, d in runs.items():
        run = stage_run(d, d.recipe.stages[1])
        run.enter(fresh=True)  # builds the regulariser's pool: the teacher's ODE from its own noise
        pools[p] = run.pool[2]
    assert pools["bf16"].dtype == torch.float32
    torch.testing.assert_close(pools["bf16"], pools["no"], rtol=1e-5, atol=1e-5)
    prompts = ["a photo of thing 0", "a photo of thing 1"]
    got, want = (sample_prompts(runs[p].teacher, prompts, 4, eta=0.3, seed=1) for p in ("bf16", "no"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- SDXL's size and crop ids ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_sdxl(tmp_path_factory):
    """(bf16 teacher, cache) of a tiny SDXL, the cache made from one image 1366 pixels wide."""
    root = tmp_path_factory.mktemp("sdxl")
    tiny_pipeline("sdxl").save_pretrained(root / "model")
    (root / "images").mkdir()
    (root / "images" / "wide.png").write_bytes(image_bytes(1366, 20))
    (root / "images" / "wide.txt").write_text("a wide photo\n")
    model = str(root / "model")
    build_cache("sdxl", model, str(root / "images"), root / "cache", teacher=load_teacher("sdxl", model),
                progress=False)
    return load_teacher("sdxl", model, dtype=torch.bfloat16), root / "cache"


def _time_ids_seen(teacher, cond) -> torch.Tensor:
    """The size/crop ids as the UNet's size embedding receives them, in one ε call."""
    seen = []
    hook = teacher.unet.add_time_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        teacher.eps(torch.randn(len(cond), *teacher.latent_shape).to(teacher.dtype), torch.tensor(999), cond)
    finally:
        hook.remove()
    return seen[0].reshape(len(cond), 6)


def test_sdxl_size_ids_reach_the_bf16_unet_unrounded(wide_sdxl):
    teacher, cache = wide_sdxl
    data = CachedData(cache, "sdxl").attach(teacher)
    _, _, cond = data.batch_cond(1, torch.Generator().manual_seed(0))
    ids = _time_ids_seen(teacher, cond)
    assert ids[0, :2].tolist() == [20.0, 1366.0]  # bf16: 1368
    torch.testing.assert_close(ids, cond.added["time_ids"], rtol=0, atol=0)
    # and from the prompt encoder, with sizes given: (1366, 1030) would be (1368, 1032) in bf16
    ids = _time_ids_seen(teacher, teacher.encode_prompt(["a wide photo"], size=(1366, 1030), crop=(0, 517)))
    assert ids[0, :4].tolist() == [1366.0, 1030.0, 0.0, 517.0]
