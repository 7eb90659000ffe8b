"""The published Hyper-SD3 and Hyper-FLUX.1-dev LoRAs in ``hypersd generate``: their recipes (steps,
guidance, LoRA scale 0.125, the stock pipeline's sigmas) and their files, built here in the layouts
diffusers' SD3 and FLUX loaders read (the files themselves cannot be downloaded), against diffusers'
own pipeline with the same file loaded by ``load_lora_weights`` and fused at 0.125, as the release's
model card runs them. Tiny SD3 / FLUX folders from configs."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from flow_tiny import LATENT_SIZE, T5_LENGTH, save_flow_tiny
from safetensors.torch import save_file

from hypersd import lora
from hypersd.cli import main
from hypersd.core.noise import shift_sigma
from hypersd.core.sampling import initial_noise
from hypersd.errors import HypersdError
from hypersd.inference.generator import Generator
from hypersd.inference.plan import resolve
from hypersd.inference.recipes import published_recipe
from hypersd.lora.layouts import read_any, to_kohya
from hypersd.teachers import load_teacher
from hypersd.teachers.flux import pack, unpack

SIDE = 2 * LATENT_SIZE
RANK, ALPHA = 4, 8.0
PROMPTS, SEEDS = ["a red cat", "two dogs"], [3, 4]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {kind: save_flow_tiny(kind, root / kind) for kind in ("sd3", "flux")}


def _random_peft(kind, folder, seed=2, every_linear=False, extra=(), a_scale=2.0):
    """(state, meta): a random LoRA of rank 4, alpha 8 on the tiny model's transformer preset, or on
    every linear layer (and the modules named in ``extra``): the published Hyper-FLUX file adapts
    context_embedder, norm_out.linear, proj_out, the time/text/guidance embedders and the single
    blocks' norm.linear too (its keys in kohya-ss/sd-scripts#1585 and #1933); the Hyper-SD3 file
    has LoRA tensors on pos_embed, a convolution (leejet/stable-diffusion.cpp#520)."""
    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    net = cls.from_pretrained(str(folder)).transformer
    targets = list(lora.TARGET_PRESETS["transformer"])
    if every_linear:
        targets = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    targets += list(extra)
    lora.add_lora(net, lora.lora_config(RANK, ALPHA, targets), "ref")
    g = torch.Generator().manual_seed(seed)
    # large enough that a wrong scale (1 instead of 0.125) or a lost alpha moves the images
    state = {k: torch.randn(v.shape, generator=g) * (1.0 if ".lora_B." in k else a_scale)
             for k, v in lora.get_state(net, "ref").items()}
    return state, {**lora.spec(net, "ref"), "backbone": kind}


def diffusers_file(path, state, alpha=None):
    """diffusers' layout, ``transformer.`` keys and no metadata; ``alpha``: one ``.alpha`` tensor per
    layer (the FLUX loader's per-layer alphas), else none (its loader then takes alpha = rank)."""
    tensors = {f"transformer.{k}": v.contiguous() for k, v in state.items()}
    if alpha is not None:
        for k in state:
            if k.endswith(".lora_A.weight"):
                tensors[f"transformer.{k[:-len('.lora_A.weight')]}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def diffusers_images(folder, kind, path, steps, guidance, scale=0.125):
    """The model card's run: the pipeline with its own scheduler, the file by ``load_lora_weights``,
    fused at ``scale``; the latents decoded by hypersd's teacher (the same VAE)."""
    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    out = []
    for prompt, seed in zip(PROMPTS, SEEDS):
        noise, _ = initial_noise(1, (16, LATENT_SIZE, LATENT_SIZE), seed)
        lat = pipe(prompt=[prompt], latents=noise if kind == "sd3" else pack(noise), num_inference_steps=steps,
                   guidance_scale=guidance, height=SIDE, width=SIDE, max_sequence_length=T5_LENGTH,
                   output_type="latent").images
        out.append(lat if kind == "sd3" else unpack(lat, LATENT_SIZE, LATENT_SIZE))
    return torch.cat(out)


def generated(folder, path, **kw):
    gen = Generator(str(folder), str(path), device="cpu", width=SIDE, height=SIDE, **kw)
    gen.teacher.max_sequence_length = T5_LENGTH
    return gen, gen.images(PROMPTS, SEEDS)


def decoded(gen, latents):
    with torch.no_grad():
        return gen.teacher.decode(latents).float()


# -- the recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, want", [
    ("Hyper-SD3-4steps-CFG-lora.safetensors", (4, 3.0, "sd3")),
    ("Hyper-SD3-8steps-CFG-lora.safetensors", (8, 5.0, "sd3")),
    ("loras/hyper-sd3-16steps-cfg-lora.safetensors", (16, 7.0, "sd3")),
    ("Hyper-FLUX.1-dev-8steps-lora.safetensors", (8, 3.5, "flux")),
    ("Hyper-FLUX.1-dev-16steps-lora.safetensors", (16, 3.5, "flux")),
])
def test_published_flow_recipes(name, want):
    r = published_recipe(name)
    assert (r.steps, r.guidance, r.backbone) == want
    assert r.lora_scale == 0.125 and r.stock_sigmas and not r.on_boundaries
    # SD3's are CFG LoRAs (two passes a step), as Hyper-SDXL's CFG files; FLUX's guidance is its embedding
    assert r.cfg == ("preserve" if r.backbone == "sd3" else None)


def test_flow_files_outside_the_release_get_no_recipe():
    for name in ("Hyper-SD3-2steps-CFG-lora.safetensors", "Hyper-SD3-8steps-lora.safetensors",
                 "Hyper-FLUX.1-dev-4steps-lora.safetensors", "Hyper-FLUX.1-schnell-8steps-lora.safetensors"):
        assert published_recipe(name) is None, name


def test_the_lora_scale_is_the_recipes_unless_given():
    recipe = published_recipe("Hyper-SD3-8steps-CFG-lora.safetensors")
    kw = {"model": "m", "backbone": "sd3", "lora": "Hyper-SD3-8steps-CFG-lora.safetensors", "T": 841,
          "default_guidance": 7.0, "spacing": "inclusive"}
    plan = resolve(recipe, **kw)
    assert plan.lora_scale == 0.125 and plan.lora_scale_from.startswith("published Hyper-SD recipe")
    plan = resolve(recipe, lora_scale=0.25, **kw)
    assert (plan.lora_scale, plan.lora_scale_from) == (0.25, "--lora-scale")
    plan = resolve(published_recipe("Hyper-SDXL-4steps-lora.safetensors"), model="m", backbone="sdxl",
                   lora="Hyper-SDXL-4steps-lora.safetensors", T=1000, default_guidance=5.0)
    assert (plan.lora_scale, plan.lora_scale_from) == (1.0, "default")


def test_a_published_flow_recipe_refuses_eta_it_cannot_sample_with():
    from hypersd.core.noise import FlowSchedule

    flow = FlowSchedule(shift=3.0, spacing="inclusive", T=841)
    kw = {"model": "m", "backbone": "sd3", "lora": "Hyper-SD3-8steps-CFG-lora.safetensors", "T": 841,
          "default_guidance": 7.0, "spacing": "inclusive", "flow": flow}
    recipe = published_recipe(kw["lora"])
    assert resolve(recipe, **kw).sigmas is not None  # Euler on the stock sigmas
    with pytest.raises(HypersdError, match="pass --eta 0"):
        resolve(recipe, scheduler="tcd", eta=0.3, **kw)


@pytest.mark.parametrize("kind, k", [("sd3", 4), ("sd3", 8), ("sd3", 16), ("sd3", 12), ("flux", 8), ("flux", 16)])
def test_stock_sigmas_are_the_pipelines_own(folders, kind, k):
    """The published recipes run the pipeline's default sigmas: SD3's scheduler set_timesteps(k),
    FluxPipeline's linspace(1, 1/k, k) (at 8 and 16 steps the boundaries of FLUX_T = 1200)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    name = ("Hyper-SD3-16steps-CFG-lora.safetensors" if kind == "sd3"
            else "Hyper-FLUX.1-dev-16steps-lora.safetensors")
    opts = {"resolution": SIDE} if kind == "flux" else {}
    teacher = load_teacher(kind, str(folders[kind]), **opts)
    flow = teacher.schedule
    plan = resolve(published_recipe(name), model="m", backbone=kind, lora=name, T=flow.T, default_guidance=1.0,
                   steps=k, spacing=flow.spacing, flow=flow)
    ours = shift_sigma(torch.tensor(plan.sigmas, dtype=torch.float64), flow.shift).float()
    config = dict(teacher.scheduler_config)
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    if kind == "sd3":
        sched.set_timesteps(k)
    else:
        tokens = (LATENT_SIZE // 2) ** 2
        mu = calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                             config["max_shift"])
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), mu=mu)
    torch.testing.assert_close(ours, sched.sigmas[:-1].float(), atol=2e-6, rtol=0)
    assert len(plan.timesteps) == k and plan.timesteps[0] == flow.T - 1


# -- the files, in generate -----------------------------------------------------------------------
def test_hyper_sd3_file_in_generate_is_the_model_cards_run(folders, tmp_path):
    """A Hyper-SD3-named file in diffusers' layout (SD3's loader reads only keys holding "lora", so no
    alpha tensors; the published file uses lora_A/lora_B: leejet/stable-diffusion.cpp#483) on every
    linear layer and the patch embedding's convolution: 8 steps at CFG 5, fused at 0.125, on the
    stock sigmas, as diffusers runs it."""
    # A at 0.25, not 2: so strong a LoRA on every layer of the tiny SD3 makes its 8 guided steps
    # chaotic (float rounding alone then moves the images by 0.1); it still moves them by 1.0
    state, _ = _random_peft("sd3", folders["sd3"], every_linear=True, extra=("pos_embed.proj",), a_scale=0.25)
    assert state["pos_embed.proj.lora_A.weight"].dim() == 4  # a convolution's LoRA
    path = diffusers_file(tmp_path / "Hyper-SD3-8steps-CFG-lora.safetensors", state)
    gen, images = generated(folders["sd3"], path)
    p = gen.plan
    assert (p.steps, p.guidance, p.lora_scale, p.scheduler) == (8, 5.0, 0.125, "euler")
    want = decoded(gen, diffusers_images(folders["sd3"], "sd3", path, 8, 5.0))
    torch.testing.assert_close(images, want, atol=2e-4, rtol=0)
    _, full = generated(folders["sd3"], path, lora_scale=1.0)  # the scale matters: the check above can fail
    assert (full - want).abs().max() > 1e-2


@pytest.mark.parametrize("alpha", [None, ALPHA])
def test_hyper_flux_file_in_generate_is_the_model_cards_run(folders, tmp_path, alpha):
    """A Hyper-FLUX.1-dev-named file in diffusers' layout on every linear layer, as the published
    file's keys are (``transformer.context_embedder.lora_A.weight``, ...: kohya-ss/sd-scripts#1585),
    with and without per-layer ``.alpha`` tensors (diffusers' FLUX loader reads both): 8 steps,
    embedded guidance 3.5, scale 0.125."""
    state, _ = _random_peft("flux", folders["flux"], every_linear=True)
    assert {"context_embedder.lora_A.weight", "norm_out.linear.lora_A.weight", "proj_out.lora_A.weight",
            "single_transformer_blocks.0.norm.linear.lora_A.weight"} <= set(state)
    path = diffusers_file(tmp_path / "Hyper-FLUX.1-dev-8steps-lora.safetensors", state, alpha)
    gen, images = generated(folders["flux"], path)
    assert (gen.plan.steps, gen.plan.guidance, gen.plan.lora_scale) == (8, 3.5, 0.125)
    want = decoded(gen, diffusers_images(folders["flux"], "flux", path, 8, 3.5))
    torch.testing.assert_close(images, want, atol=2e-4, rtol=0)


def test_diffusers_alpha_tensors_are_read_as_each_layers_alpha(folders, tmp_path):
    state, _ = _random_peft("flux", folders["flux"])
    plain, _ = read_any(diffusers_file(tmp_path / "plain.safetensors", state))
    with_alpha, meta = read_any(diffusers_file(tmp_path / "alpha.safetensors", state, ALPHA))
    assert meta["alpha"] == ALPHA and meta["rank"] == RANK
    assert all(torch.equal(with_alpha[k], plain[k]) for k in plain)  # one alpha everywhere: kept as it is
    tensors = {f"transformer.{k}": v for k, v in state.items()}
    first = next(k for k in state if k.endswith(".lora_A.weight"))[:-len(".lora_A.weight")]
    tensors[f"transformer.{first}.alpha"] = torch.tensor(2.0 * RANK)  # one layer with its own alpha
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    mixed, meta = read_any(tmp_path / "mixed.safetensors")
    assert meta["alpha"] == meta["rank"]  # folded into B per layer
    torch.testing.assert_close(mixed[f"{first}.lora_B.weight"], 2 * state[f"{first}.lora_B.weight"])
    other = next(k for k in state if k.endswith(".lora_B.weight") and not k.startswith(first + "."))
    torch.testing.assert_close(mixed[other], state[other])
    tensors[f"transformer.{first}.alpha"] = torch.ones(2)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(HypersdError, match="is not one float"):
        read_any(tmp_path / "bad.safetensors")
    tensors[f"transformer.{first}.alpha"] = torch.tensor(1.0)
    tensors["transformer.nothing_here.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "stray.safetensors"))
    with pytest.raises(HypersdError, match="belongs to no layer"):
        read_any(tmp_path / "stray.safetensors")


@pytest.mark.parametrize("every_layer", [False, True])
def test_a_kohya_sd3_file_generates_as_its_diffusers_twin(folders, tmp_path, every_layer):
    """diffusers reads no kohya SD3 file; generate reads it with hypersd's reader, and makes the
    images diffusers makes from the same LoRA in its own layout. On every layer, as the published
    Hyper-SD3 file is: the patch embedding, norm_out and the last block's context modulation too."""
    kw = dict(every_linear=True, extra=("pos_embed.proj",), a_scale=0.25) if every_layer else {}
    state, meta = _random_peft("sd3", folders["sd3"], **kw)
    kohya = tmp_path / "Hyper-SD3-4steps-CFG-lora.safetensors"
    save_file({k: v.contiguous() for k, v in to_kohya(state, meta).items()}, str(kohya))
    gen, images = generated(folders["sd3"], kohya)
    assert (gen.plan.steps, gen.plan.guidance) == (4, 3.0)
    # diffusers' SD3 loader takes alpha = rank: the twin for it has alpha/rank folded into B
    folded = {k: v * (ALPHA / RANK) if ".lora_B." in k else v for k, v in state.items()}
    twin = diffusers_file(tmp_path / "twin.safetensors", folded)
    want = decoded(gen, diffusers_images(folders["sd3"], "sd3", twin, 4, 3.0))
    torch.testing.assert_close(images, want, atol=2e-4, rtol=0)


def test_cli_says_where_the_lora_scale_came_from(folders, tmp_path, capsys):
    state, _ = _random_peft("flux", folders["flux"])
    path = diffusers_file(tmp_path / "Hyper-FLUX.1-dev-8steps-lora.safetensors", state, ALPHA)
    args = ["generate", "--model", str(folders["flux"]), "--lora", str(path), "--prompt", "a cat", "--width",
            str(SIDE), "--height", str(SIDE), "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) in (0, None)
    out = capsys.readouterr().out
    assert "lora scale 0.125 [published Hyper-SD recipe for Hyper-FLUX.1-dev-8steps-lora]" in out
    assert main([*args, "--lora-scale", "0.5", "--out", str(tmp_path / "b")]) in (0, None)
    assert "lora scale 0.5 [--lora-scale]" in capsys.readouterr().out


def test_lora_inspect_and_convert_read_a_hyper_flux_file(folders, tmp_path, capsys):
    state, _ = _random_peft("flux", folders["flux"])
    path = diffusers_file(tmp_path / "Hyper-FLUX.1-dev-16steps-lora.safetensors", state, ALPHA)
    assert main(["lora", "inspect", str(path)]) in (0, None)
    out = capsys.readouterr().out
    assert f"diffusers layout, {len(state) // 2} layers of a transformer (SD3 / FLUX), rank 4, alpha 8" in out
    assert "Hyper-FLUX.1-dev-16steps-lora: flux, 16 steps, guidance 3.5, LoRA scale 0.125" in out
    kohya = tmp_path / "kohya.safetensors"
    assert main(["lora", "convert", str(path), str(kohya), "--to", "kohya", "--backbone", "flux"]) in (0, None)
    back, meta = read_any(kohya)
    assert meta["rank"] == RANK and meta["alpha"] == ALPHA and set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)  # B·A as the file had it, bit for bit
