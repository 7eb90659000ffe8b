"""hypersd generate: diffusers' pipelines on hypersd's segment boundaries, against hypersd's own sampler."""

import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    retrieve_timesteps,
)
from PIL import Image
from safetensors.torch import save_file
from sd_tiny import SD_SCHEDULE, save_tiny

from hypersd import lora
from hypersd.cli import main
from hypersd.core.sampling import sample_prompts
from hypersd.core.schedule import inference_timesteps
from hypersd.errors import HypersdError
from hypersd.inference.choices import COMPILE_MIN_IMAGES, pick_compile, pick_path
from hypersd.inference.generator import Generator
from hypersd.inference.jobs import plan_jobs, read_prompts
from hypersd.inference.models import detect_backbone
from hypersd.inference.plan import resolve
from hypersd.inference.recipes import Recipe, published_recipe
from hypersd.inference.schedulers import make_scheduler, scheduler_call_args
from hypersd.lora.layouts import read_any, to_diffusers
from hypersd.teachers import load_teacher


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: str(save_tiny(kind, root / kind)) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def sd15_lora(models, tmp_path_factory):
    """A hypersd LoRA with random weights (a fresh one is the identity), a guidance and a one-step t."""
    teacher = load_teacher("sd15", models["sd15"])
    lora.add_lora(teacher.unet, lora.lora_config(4, 8, "all"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora.adapter_params(teacher.unet, lora.STUDENT):
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    lora.save_lora(path, teacher.unet, {"kind": "hypersd-lora", "guidance": 2.0, "one_step_t": 800,
                                        "backbone": "sd15"})
    return path


def reference(model, kind, prompts, seeds, steps, guidance, eta=0.0, lora_path=None, one_step_t=None):
    """hypersd's own sampler (sample_tcd through sample_prompts) and the VAE decode, image by image."""
    teacher = load_teacher(kind, model)
    if lora_path:
        lora.load_lora(teacher.unet, lora_path)
    with torch.no_grad():
        return torch.cat([teacher.decode(sample_prompts(teacher, [p], steps, guidance=guidance, eta=eta, seed=s,
                                                        one_step_t=one_step_t))
                          for p, s in zip(prompts, seeds)])


# -- the scheduler's timesteps -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tcd", "ddim"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_scheduler_timesteps_are_segment_boundaries(kind, k):
    config = {**SD_SCHEDULE, "steps_offset": 1, "set_alpha_to_one": False}
    plan = resolve(Recipe(), model="m", backbone="sd15", lora=None, T=1000, default_guidance=7.5, steps=k,
                   scheduler=kind)
    scheduler = make_scheduler(kind, config)
    args = scheduler_call_args(plan)
    # what the pipeline does with them
    timesteps, n = retrieve_timesteps(scheduler, args.get("num_inference_steps"), "cpu", args.get("timesteps"))
    assert timesteps.tolist() == plan.timesteps == inference_timesteps(k, 1000) and n == k


def test_one_step_timestep_from_the_lora():
    plan = resolve(Recipe(scheduler="tcd", one_step_t=800, on_boundaries=True), model="m",
                   backbone="sd15", lora="l.safetensors", T=1000, default_guidance=7.5, steps=1)
    scheduler = make_scheduler("tcd", dict(SD_SCHEDULE))
    timesteps, _ = retrieve_timesteps(scheduler, None, "cpu", scheduler_call_args(plan)["timesteps"])
    assert timesteps.tolist() == [800] == inference_timesteps(1, 1000, 800)
    # at more steps the unified LoRA's boundaries stand
    plan = resolve(Recipe(scheduler="tcd", one_step_t=800, on_boundaries=True), model="m",
                   backbone="sd15", lora="l.safetensors", T=1000, default_guidance=7.5, steps=2)
    assert plan.timesteps == [999, 499] and plan.one_step_t is None
    with pytest.raises(HypersdError, match="use --scheduler tcd"):
        resolve(Recipe(one_step_t=800, on_boundaries=True), model="m", backbone="sd15",
                lora="l.safetensors", T=1000, default_guidance=7.5, steps=1, scheduler="ddim")


def test_the_loras_recommended_eta_is_used_unless_eta_is_given():
    from hypersd.inference.recipes import hypersd_recipe

    recipe = hypersd_recipe({"guidance": 1.0, "backbone": "sd15", "recommended_eta": {"1": 0.0, "4": 0.3}}, "l")
    kw = dict(model="m", backbone="sd15", lora="l.safetensors", T=1000, default_guidance=7.5)
    assert resolve(recipe, steps=4, **kw).eta == 0.3
    assert resolve(recipe, steps=2, **kw).eta == 0.0  # none measured at 2 steps: DDIM
    assert resolve(recipe, steps=4, eta=0.0, **kw).eta == 0.0  # the command line wins
    assert resolve(recipe, steps=4, scheduler="ddim", **kw).eta == 0.0  # DDIM has no eta


def test_the_eta_multi_step_dmd_trained_at_is_used_where_none_was_measured():
    from hypersd.eval.digits import recorded_eta
    from hypersd.inference.recipes import hypersd_recipe

    meta = {"guidance": 1.0, "backbone": "sd15", "trained_eta": {"2": 0.5, "4": 0.5}}
    kw = dict(model="m", backbone="sd15", lora="l.safetensors", T=1000, default_guidance=7.5)
    assert resolve(hypersd_recipe(meta, "l"), steps=2, **kw).eta == 0.5  # a --no-eval run's LoRA
    assert resolve(hypersd_recipe(meta, "l"), steps=8, **kw).eta == 0.0
    measured = {**meta, "recommended_eta": {"4": 0.3}}
    assert resolve(hypersd_recipe(measured, "l"), steps=4, **kw).eta == 0.3  # the measured eta wins
    assert resolve(hypersd_recipe(measured, "l"), steps=2, **kw).eta == 0.5
    assert [recorded_eta(measured, k) for k in (1, 2, 4)] == [0.0, 0.5, 0.3]  # the digits metrics' eta


# -- images equal hypersd's sampler ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_model_alone_equals_hypersd_sampler(models, kind):
    gen = Generator(models[kind], steps=2, scheduler="ddim", guidance=3.0, device="cpu")
    assert gen.plan.backbone == kind and gen.plan.timesteps == [999, 499]
    prompts, seeds = ["a cat", "a red house"], [5, 9]
    images = gen.images(prompts, seeds)
    ref = reference(models[kind], kind, prompts, seeds, 2, 3.0)
    assert images.shape == ref.shape == (2, 3, 16, 16)
    assert images.std() > 0.05  # not a blank image on both sides
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_width_and_height_give_hypersd_samplers_image_of_that_size(models, kind):
    """--width/--height on SD1.5 and SDXL: the pipeline at 24 x 16 gives hypersd's sampler's image of
    that latent shape; SDXL's size ids are that size, its unconditional row's as well (as the pipeline
    pairs them)."""
    from hypersd.core.sampling import guided, initial_noise, sample_tcd

    gen = Generator(models[kind], steps=2, scheduler="ddim", guidance=3.0, device="cpu", width=24, height=16)
    prompts, seeds = ["a cat", "a red house"], [5, 9]
    images = gen.images(prompts, seeds)
    assert images.shape == (2, 3, 16, 24) and (gen.plan.width, gen.plan.height) == (24, 16)
    teacher = load_teacher(kind, models[kind])
    c, f, s = teacher.latent_shape[0], teacher.vae_scale_factor, teacher.schedule
    ref = []
    for prompt, seed in zip(prompts, seeds):
        noise, g = initial_noise(1, (c, 16 // f, 24 // f), seed)
        size = {"size": (16, 24), "target": (16, 24)} if kind == "sdxl" else {}
        with torch.no_grad():
            x0 = sample_tcd(guided(teacher, teacher.encode_prompt([prompt], **size), 3.0), noise,
                            s.inference_timesteps(2), s, eta=0.0, generator=g)
            ref.append(teacher.decode(x0))
    torch.testing.assert_close(images, torch.cat(ref), atol=1e-4, rtol=0)


def test_a_seed_gives_one_image_in_every_dtype(models):
    """x_T is drawn in float32 and cast, as hypersd's sampler draws it: bfloat16 gives the float32
    image up to its rounding, not another image."""
    kw = dict(steps=2, scheduler="ddim", guidance=3.0, device="cpu")
    full = Generator(models["sd15"], dtype="float32", **kw).images(["a cat"], [11])
    half = Generator(models["sd15"], dtype="bfloat16", **kw)
    assert half.teacher.unet.dtype == torch.bfloat16
    assert (half.images(["a cat"], [11]) - full).abs().mean() < 0.02


def test_hypersd_lora_equals_hypersd_sampler(models, sd15_lora):
    """TCD with eta > 0 re-noises from the per-image generator; the LoRA's metadata gives the guidance."""
    gen = Generator(models["sd15"], str(sd15_lora), steps=4, eta=0.3, device="cpu")
    assert (gen.plan.scheduler, gen.plan.guidance) == ("tcd", 2.0)
    images = gen.images(["a cat", "a dog"], [3, 4])
    assert gen.pipe.scheduler.timesteps.tolist() == inference_timesteps(4)
    ref = reference(models["sd15"], "sd15", ["a cat", "a dog"], [3, 4], 4, 2.0, eta=0.3, lora_path=sd15_lora)
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=0)
    base = reference(models["sd15"], "sd15", ["a cat", "a dog"], [3, 4], 4, 2.0, eta=0.3)
    assert (images - base).abs().max() > 0.05  # the LoRA is really applied

    one = Generator(models["sd15"], str(sd15_lora), steps=1, device="cpu")
    image = one.images(["a cat"], [3])
    assert one.pipe.scheduler.timesteps.tolist() == [800]
    torch.testing.assert_close(image, reference(models["sd15"], "sd15", ["a cat"], [3], 1, 2.0, lora_path=sd15_lora,
                                                one_step_t=800), atol=1e-4, rtol=0)


def _shifted_backend(gm, example_inputs):
    """A 'compiler' whose code gives other numbers: the check must catch it."""
    def run(*args):
        return [o + 0.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in gm(*args)]
    return run


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_compiled_path_gives_the_eager_images(models, sd15_lora):
    """The compiled UNet and VAE decoder (aot_eager: dynamo's graph capture without a C++ compile)
    give eager's images; the first batch decides the path and says what it measured."""
    import torch._dynamo

    torch._dynamo.reset()
    kw = dict(steps=2, eta=0.3, device="cpu")
    prompts, seeds = ["a cat", "a dog"], [3, 4]
    eager = Generator(models["sd15"], str(sd15_lora), **kw)
    fast = Generator(models["sd15"], str(sd15_lora), compile=True, compile_backend="aot_eager", **kw)
    assert (eager.path, fast.path) == ("eager", "undecided")
    want = eager.images(prompts, seeds)
    torch.testing.assert_close(fast.images(prompts, seeds), want, atol=1e-5, rtol=0)
    assert fast.path in ("eager", "compiled") and "max |diff|" in fast.path_note
    fast._paths[2] = ("compiled", "forced")  # whatever the timing chose: the compiled modules themselves
    again = fast.images(["a red house", "a cat"], [7, 3])
    assert isinstance(fast.pipe.unet, torch._dynamo.eval_frame.OptimizedModule) and fast.path == "compiled"
    assert fast.pipe.unet.config.sample_size == eager.pipe.unet.config.sample_size
    torch.testing.assert_close(again, eager.images(["a red house", "a cat"], [7, 3]), atol=1e-5, rtol=0)
    # a new batch size is checked on its own (compiled code is specialised to it). Not batch 1:
    # aot_eager on the CPU trips on the VAE's group norm there (a stride it traced otherwise), which
    # the check turns into the eager path, as the failing compiler below shows.
    torch.testing.assert_close(fast.images(["a dog", "a cat", "a dog"], [4, 3, 4]), want[[1, 0, 1]], atol=1e-5, rtol=0)
    assert "batch 3: " in fast.path_note and "failed" not in fast.path_note and "other images" not in fast.path_note


@pytest.mark.parametrize("backend,why", [(_shifted_backend, "other images"), (_failing_backend, "compiling failed")])
def test_compiled_path_is_kept_only_if_it_gives_eager_images(models, backend, why):
    import torch._dynamo

    torch._dynamo.reset()
    kw = dict(steps=1, scheduler="ddim", guidance=3.0, device="cpu")
    want = Generator(models["sd15"], **kw).images(["a cat"], [5])
    gen = Generator(models["sd15"], compile=True, compile_backend=backend, **kw)
    torch.testing.assert_close(gen.images(["a cat"], [5]), want, atol=1e-5, rtol=0)  # eager's, either way
    assert gen.path == "eager" and why in gen.path_note
    assert not gen._compiled.active and gen.pipe.unet is gen.teacher.unet
    torch.testing.assert_close(gen.images(["a cat"], [5]), want, atol=1e-5, rtol=0)


def test_path_choice():
    assert pick_path(0.001, eager_s=0.05, compiled_s=0.02)[0] == "compiled"
    assert pick_path(0.001, eager_s=0.02, compiled_s=0.05)[0] == "eager"
    assert pick_path(0.5, eager_s=0.05, compiled_s=0.02)[0] == "eager"
    assert pick_path(float("nan"), eager_s=0.05, compiled_s=0.02)[0] == "eager"
    assert pick_compile("auto", "cpu", 1000) is False
    assert pick_compile("auto", "cuda", COMPILE_MIN_IMAGES - 1) is False
    assert pick_compile("auto", "cuda:1", COMPILE_MIN_IMAGES) is True
    assert pick_compile("on", "cpu", 1) is True and pick_compile("off", "cuda", 10_000) is False
    with pytest.raises(HypersdError, match="--compile"):
        pick_compile("fast", "cpu", 1)


def test_published_file_gets_its_recipe(models, sd15_lora, tmp_path):
    """A file named as Hyper-SD's 2-step LoRA, in diffusers' layout and without hypersd metadata:
    DDIM trailing at 2 steps, no CFG."""
    path = tmp_path / "Hyper-SD15-2steps-lora.safetensors"
    save_file(to_diffusers(*read_any(sd15_lora)), str(path))
    gen = Generator(models["sd15"], str(path), device="cpu")
    assert (gen.plan.steps, gen.plan.scheduler, gen.plan.guidance, gen.plan.eta) == (2, "ddim", 0.0, 0.0)
    assert gen.plan.recipe.startswith("published Hyper-SD recipe")
    images = gen.images(["a cat"], [7])
    # guidance 0 in diffusers is no CFG, which is hypersd's guidance 1
    torch.testing.assert_close(images, reference(models["sd15"], "sd15", ["a cat"], [7], 2, 1.0, lora_path=sd15_lora),
                               atol=1e-4, rtol=0)
    with pytest.raises(HypersdError, match="is an sd15 LoRA but .* is an sdxl model"):
        Generator(models["sdxl"], str(path), device="cpu")


@pytest.mark.parametrize("name, want", [
    ("Hyper-SD15-1step-lora.safetensors", (1, "tcd", 1.0, 0.0, "sd15")),
    ("Hyper-SDXL-1step-lora.safetensors", (1, "tcd", 1.0, 0.0, "sdxl")),
    ("Hyper-SD15-4steps-lora.safetensors", (4, "ddim", 0.0, 0.0, "sd15")),
    ("Hyper-SDXL-8steps-lora.safetensors", (8, "ddim", 0.0, 0.0, "sdxl")),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", (8, "ddim", 0.0, 5.0, "sdxl")),
    ("downloads/Hyper-SD15-12steps-CFG-lora.safetensors", (12, "ddim", 0.0, 5.0, "sd15")),
])
def test_published_recipes(name, want):
    r = published_recipe(name)
    assert (r.steps, r.scheduler, r.eta, r.guidance, r.backbone) == want


def test_published_recipe_edge_cases():
    assert published_recipe("my-lora.safetensors") is None
    assert published_recipe("Hyper-SDXL-1step-Unet.safetensors") is None  # a full UNet, not a LoRA
    # 12 does not divide 1000: the published recipe's DDIM trailing spacing, as diffusers makes it
    plan = resolve(published_recipe("Hyper-SD15-12steps-CFG-lora.safetensors"), model="m", backbone="sd15",
                   lora="Hyper-SD15-12steps-CFG-lora.safetensors", T=1000, default_guidance=7.5)
    assert len(plan.timesteps) == 12 and plan.timesteps[0] == 999 and plan.timesteps[3] == 749
    assert plan.timesteps == sorted(plan.timesteps, reverse=True)
    # the command line wins over the recipe
    plan = resolve(published_recipe("Hyper-SDXL-1step-lora.safetensors"), model="m", backbone="sdxl",
                   lora="Hyper-SDXL-1step-lora.safetensors", T=1000, default_guidance=5.0, steps=4, eta=0.5)
    assert (plan.steps, plan.eta, plan.scheduler, plan.timesteps) == (4, 0.5, "tcd", [999, 749, 499, 249])
    # a hypersd LoRA is trained on the boundaries: a step count without them is refused
    with pytest.raises(HypersdError, match="do not divide"):
        resolve(Recipe(on_boundaries=True), model="m", backbone="sd15", lora="l", T=1000,
                default_guidance=7.5, steps=3)


def test_settings_refused_in_one_line():
    kw = dict(model="m", backbone="sd15", T=1000, default_guidance=7.5)
    with pytest.raises(HypersdError, match="pass --steps N"):
        resolve(Recipe(), lora="other.safetensors", **kw)
    with pytest.raises(HypersdError, match="needs --scheduler tcd"):
        resolve(Recipe(), lora=None, steps=4, scheduler="ddim", eta=0.5, **kw)
    with pytest.raises(HypersdError, match="between 0 and 1"):
        resolve(Recipe(), lora=None, steps=4, scheduler="tcd", eta=1.5, **kw)
    plan = resolve(Recipe(), lora=None, **kw)  # the model alone: 25 steps at its own guidance
    assert (plan.steps, plan.guidance, plan.scheduler) == (25, 7.5, "ddim")


# -- files ------------------------------------------------------------------------------------------
def test_backbone_detection(models, tmp_path):
    assert detect_backbone(models["sd15"]) == "sd15" and detect_backbone(models["sdxl"]) == "sdxl"
    for keys, want in ((["conditioner.embedders.1.model.ln_final.weight"], "sdxl"),
                       (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "sd15")):
        path = tmp_path / f"{want}.safetensors"
        save_file({k: torch.zeros(1) for k in keys}, str(path))
        assert detect_backbone(str(path)) == want
    save_file({"something.else": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(HypersdError, match="pass --backbone"):
        detect_backbone(str(tmp_path / "odd.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"not a pickle we would open")
    with pytest.raises(HypersdError, match="safetensors only"):
        detect_backbone(str(tmp_path / "model.ckpt"))
    with pytest.raises(HypersdError, match="no unet/config.json"):
        detect_backbone(str(tmp_path))
    with pytest.raises(HypersdError, match="not sdxl"):
        Generator(models["sd15"], backbone="sdxl", device="cpu")


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog on a hill  \n")
    assert read_prompts(path) == ["a cat", "a dog on a hill"]
    path.write_text("\n \n")
    with pytest.raises(HypersdError, match="holds no prompt"):
        read_prompts(path)
    with pytest.raises(HypersdError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    jobs = plan_jobs(["a", "b"], tmp_path / "out", per_prompt=2, seed=10)
    assert [(j.path.name, j.prompt, j.seed) for j in jobs] == [
        ("00000.png", "a", 10), ("00001.png", "a", 11), ("00002.png", "b", 12), ("00003.png", "b", 13)]


def test_cli_writes_pngs_with_metadata(models, sd15_lora, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na lighthouse at night\n")
    out = tmp_path / "images"
    args = ["generate", "--model", models["sd15"], "--lora", str(sd15_lora), "--prompts", str(prompts),
            "--steps", "2", "--eta", "0.5", "--per-prompt", "2", "--batch-size", "3", "--seed", "20", "--out", str(out),
            "--quiet", "--device", "cpu"]
    assert main(args) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    texts = []
    for f in files:
        with Image.open(f) as im:
            texts.append(dict(im.text))
            assert im.size == (16, 16) and im.mode == "RGB"
    assert [t["prompt"] for t in texts] == ["a cat", "a cat", "a lighthouse at night", "a lighthouse at night"]
    settings = [json.loads(t["hypersd"]) for t in texts]
    assert [s["seed"] for s in settings] == [20, 21, 22, 23]
    assert settings[0]["timesteps"] == [999, 499] and settings[0]["eta"] == 0.5 and settings[0]["guidance"] == 2.0
    assert settings[0]["lora"] == str(sd15_lora) and settings[0]["scheduler"] == "tcd"

    # image 3 came from a batch with image 2; alone, from its seed, it is the same image
    gen = Generator(models["sd15"], str(sd15_lora), steps=2, eta=0.5, device="cpu")
    alone = gen.images(["a lighthouse at night"], [23])[0]
    alone = alone.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    written = np.asarray(Image.open(files[3]))
    assert np.abs(alone.astype(int) - written.astype(int)).max() <= 1

    # nothing is overwritten without --force, and the refusal comes before any generation
    before = files[0].read_bytes()
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert files[0].read_bytes() == before  # same seed, same image
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind


def test_cli_errors_are_one_line(models, tmp_path, capsys):
    assert main(["generate", "--model", models["sd15"], "--out", str(tmp_path / "o")]) == 2
    assert "pass --prompt TEXT" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "a", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "hypersd: error:" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--model", models["sd15"], "--lora", str(tmp_path / "none.safetensors"),
                 "--prompt", "a", "--out", str(tmp_path / "o")]) == 2
    assert "LoRA file" in capsys.readouterr().err
