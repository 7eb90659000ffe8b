"""SD3 and FLUX.1 teachers against diffusers' own pipelines, on tiny models saved as diffusers folders:
the prompt embeddings are StableDiffusion3Pipeline's / FluxPipeline's, and hypersd's k-step sampler
on the teacher (``sample_tcd`` at γ = 0 on ``schedule.inference_timesteps(k)``) gives the pipeline's
latents when the pipeline is given ``sigmas=schedule.pipeline_sigmas(k)``."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from flow_tiny import LATENT_SIZE, T5_LENGTH, save_flow_tiny
from random_lora import save_random_lora

from hypersd.core.noise import flux_shift
from hypersd.core.sampling import guided, initial_noise, sample_tcd
from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher
from hypersd.teachers.flux import pack, unpack

PROMPTS = ["a red cat", "two dogs on a hill"]
SIDE = 2 * LATENT_SIZE  # image side of the tiny models


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {kind: save_flow_tiny(kind, root / kind) for kind in ("sd3", "flux", "flux-schnell")}


def teacher(folders, kind):
    backbone = "sd3" if kind == "sd3" else "flux"
    opts = {"max_sequence_length": T5_LENGTH} | ({} if kind == "sd3" else {"resolution": SIDE})
    return load_teacher(backbone, str(folders[kind]), **opts)


def pipeline(folders, kind):
    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(str(folders[kind]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_teacher_loads_with_its_schedule(folders):
    t = teacher(folders, "sd3")
    assert t.latent_shape == (16, LATENT_SIZE, LATENT_SIZE) and t.T == 841 and t.prediction_type == "flow"
    s = t.schedule
    assert (s.shift, s.timestep_scale, s.spacing) == (3.0, 1000.0, "inclusive")
    assert t.transformer is t.unet and not any(p.requires_grad for p in t.unet.parameters())


def test_flux_teacher_schedule_is_the_training_resolutions_shift(folders):
    t = teacher(folders, "flux")
    s = t.schedule
    assert t.latent_shape == (16, LATENT_SIZE, LATENT_SIZE) and t.T == 1200  # FLUX_T: 16 divides it
    assert s.shift == pytest.approx(flux_shift((LATENT_SIZE // 2) ** 2)) and s.shift != 3.0
    assert (s.timestep_scale, s.spacing) == (1.0, "trailing")
    assert t.guidance_embeds and t.guidance == 3.5
    schnell = teacher(folders, "flux-schnell")
    assert schnell.schedule.shift == 1.0 and not schnell.guidance_embeds and schnell.guidance is None
    big = load_teacher("flux", str(folders["flux"]), resolution=4 * SIDE)  # more tokens, more shift
    assert big.latent_shape == (16, 4 * LATENT_SIZE, 4 * LATENT_SIZE) and big.schedule.shift > s.shift


def test_sd3_prompt_embeddings_are_the_pipelines(folders):
    t, pipe = teacher(folders, "sd3"), pipeline(folders, "sd3")
    cond = t.encode_prompt(PROMPTS)
    with torch.no_grad():  # T5's attention takes another kernel with autograd on (6e-7 apart)
        hidden, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=T5_LENGTH,
                                                             do_classifier_free_guidance=True)
    assert cond.hidden.shape == (2, 16 + T5_LENGTH, 80) and cond.added["pooled_projections"].shape == (2, 64)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.added["pooled_projections"], pooled)
    empty = t.empty_cond(2)  # "" encoded once and repeated; the pipeline encodes a batch of them
    assert torch.allclose(empty.hidden, neg, atol=1e-6, rtol=0)
    assert torch.allclose(empty.added["pooled_projections"], neg_pooled, atol=1e-6, rtol=0)
    assert cond.hidden[:, :16, 64:].abs().max() == 0  # the CLIP pair zero-padded to T5's width


def test_flux_prompt_embeddings_are_the_pipelines(folders):
    t, pipe = teacher(folders, "flux"), pipeline(folders, "flux")
    cond = t.encode_prompt(PROMPTS)
    with torch.no_grad():
        hidden, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=T5_LENGTH)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.added["pooled_projections"], pooled)
    assert text_ids.shape == (T5_LENGTH, 3) and not text_ids.any()


def test_pack_and_unpack_are_flux_pipelines():
    x = torch.randn(2, 16, 6, 4)
    packed = pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 4))
    assert torch.equal(unpack(packed, 6, 4), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6, 4, 1), x)


def ours(t, k, guidance, seed=0):
    """hypersd's Euler sampler (γ = 0) on the teacher's k-step boundaries, from a seed's x_T."""
    noise, _ = initial_noise(len(PROMPTS), t.latent_shape, seed)
    cond = t.encode_prompt(PROMPTS)
    s = t.schedule
    with torch.no_grad():
        return noise, sample_tcd(guided(t, cond, guidance), noise, s.inference_timesteps(k), s, eta=0.0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sd3_sampler_equals_the_pipeline_with_cfg(folders, k):
    t, pipe = teacher(folders, "sd3"), pipeline(folders, "sd3")
    noise, got = ours(t, k, 4.0)
    ref = pipe(prompt=PROMPTS, latents=noise, guidance_scale=4.0, sigmas=t.schedule.pipeline_sigmas(k),
               height=SIDE, width=SIDE, max_sequence_length=T5_LENGTH, output_type="latent").images
    assert (got - noise).abs().max() > 0.1
    assert (got - ref).abs().max() < 1e-5
    _, unguided = ours(t, k, 1.0)
    assert (unguided - got).abs().max() > 1e-3  # the guidance mattered


class Calls:
    """Records the batch size and guidance of every transformer call."""

    def __init__(self, module):
        self.seen = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        g = kwargs.get("guidance")
        self.seen.append((kwargs["hidden_states"].shape[0], None if g is None else g.tolist()))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_flux_dev_sampler_equals_the_pipeline_with_one_guided_pass_a_step(folders, k):
    t, pipe = teacher(folders, "flux"), pipeline(folders, "flux")
    calls = Calls(t.unet)
    noise, got = ours(t, k, 2.5)
    assert calls.seen == [(2, [2.5, 2.5])] * k  # one pass of the batch per step, ω as the embedding
    assert t.guidance == 2.5  # recorded, for the student's calls and the LoRA's metadata
    ref = pipe(prompt=PROMPTS, latents=pack(noise), guidance_scale=2.5, sigmas=t.schedule.pipeline_sigmas(k),
               height=SIDE, width=SIDE, max_sequence_length=T5_LENGTH, output_type="latent").images
    assert (got - noise).abs().max() > 0.1
    assert (got - unpack(ref, LATENT_SIZE, LATENT_SIZE)).abs().max() < 1e-5
    _, other = ours(t, k, 5.0)
    assert (other - got).abs().max() > 1e-4  # the embedding's value mattered


@pytest.mark.parametrize("k", [1, 2, 4])
def test_flux_schnell_sampler_equals_the_pipeline_without_guidance(folders, k):
    t, pipe = teacher(folders, "flux-schnell"), pipeline(folders, "flux-schnell")
    calls = Calls(t.unet)
    noise, got = ours(t, k, 3.0)
    assert calls.seen == [(2, None)] * k
    ref = pipe(prompt=PROMPTS, latents=pack(noise), sigmas=t.schedule.pipeline_sigmas(k), height=SIDE, width=SIDE,
               max_sequence_length=T5_LENGTH, output_type="latent").images
    assert (got - unpack(ref, LATENT_SIZE, LATENT_SIZE)).abs().max() < 1e-5


def test_decode_is_the_pipelines(folders):
    """The VAE's shift and scale, both ways, as the flow pipelines apply them."""
    t, pipe = teacher(folders, "sd3"), pipeline(folders, "sd3")
    z = torch.randn(1, 16, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        assert torch.allclose(t.decode(z), want.clamp(-1, 1), atol=1e-6)
        back = t.encode(t.decode(z))
    assert back.shape == z.shape


def test_a_model_of_the_other_family_is_refused_naming_the_backbone(folders):
    with pytest.raises(HypersdError, match="FluxTransformer2DModel.*use backbone flux"):
        load_teacher("sd3", str(folders["flux"]))
    with pytest.raises(HypersdError, match="SD3Transformer2DModel.*use backbone sd3"):
        load_teacher("flux", str(folders["sd3"]))


def test_bad_sources_are_refused(folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(HypersdError, match="no 'transformer' component"):
        load_teacher("sd3", str(broken))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(HypersdError, match="not a .safetensors checkpoint"):
        load_teacher("flux", str(ckpt))
    with pytest.raises(HypersdError, match="multiple of 4 pixels"):
        load_teacher("flux", str(folders["flux"]), resolution=18)
    with pytest.raises(HypersdError, match="no guidance embedding"):
        load_teacher("flux", str(folders["flux-schnell"]), resolution=SIDE, guidance=3.5)
    with pytest.raises(HypersdError, match="takes no options"):
        load_teacher("sd15", "some/model", resolution=512)


# -- hypersd generate on SD3 and FLUX ----------------------------------------------------------------
def reference_images(t, prompts, seeds, k, guidance, latent_shape, eta=0.0):
    """hypersd's sampler on the teacher, one image per seed (its generator drives the re-noising), decoded."""
    out = []
    for p, seed in zip(prompts, seeds):
        noise, g = initial_noise(1, latent_shape, seed)
        s = t.schedule
        with torch.no_grad():
            x0 = sample_tcd(guided(t, t.encode_prompt([p]), guidance), noise, s.inference_timesteps(k), s,
                            eta=eta, generator=g)
            out.append(t.decode(x0))
    return torch.cat(out)


@pytest.mark.parametrize("kind,guidance", [("sd3", 3.0), ("flux", 2.0)])
def test_generate_equals_hypersd_sampler_on_the_teachers_sigmas(folders, kind, guidance):
    from hypersd.inference.generator import Generator

    gen = Generator(str(folders[kind]), steps=2, guidance=guidance, device="cpu", width=SIDE, height=SIDE)
    assert gen.plan.backbone == kind and gen.plan.scheduler == "euler"
    assert gen.plan.timesteps == gen.teacher.schedule.inference_timesteps(2)
    prompts, seeds = ["a cat", "a red house"], [5, 9]
    images = gen.images(prompts, seeds)
    ref = reference_images(gen.teacher, prompts, seeds, 2, guidance, gen.latent_shape)
    assert images.shape == ref.shape == (2, 3, SIDE, SIDE) and images.std() > 0.01
    assert (images - ref).abs().max() < 1e-4


def test_flux_generate_at_16_steps_gives_the_pipeline_the_16_segment_boundaries(folders):
    """--steps 16 on FLUX: the plan's timesteps are the boundaries of 16 segments on the N = 48 grid
    (what TSCD with 16 segments trains on), the sigmas given to the pipeline FluxPipeline's own
    16-step linspace(1, 1/16, 16), and the images hypersd's sampler's."""
    from hypersd.core.schedule import Segments
    from hypersd.inference.generator import Generator
    from hypersd.inference.schedulers import flow_call_args

    gen = Generator(str(folders["flux"]), steps=16, device="cpu", width=SIDE, height=SIDE)
    s = gen.teacher.schedule
    assert gen.plan.timesteps == Segments(16, s.solver_grid(48)).boundaries == list(range(1199, 0, -75))
    assert flow_call_args(gen.plan, s)["sigmas"] == pytest.approx([1 - j / 16 for j in range(16)])
    images = gen.images(["a cat"], [2])
    ran = gen.pipe.scheduler.sigmas[:-1]
    assert torch.allclose(ran, s.sigma(torch.tensor(gen.plan.timesteps)), atol=1e-6, rtol=0)
    ref = reference_images(gen.teacher, ["a cat"], [2], 16, gen.plan.guidance, gen.latent_shape)
    assert (images - ref).abs().max() < 1e-4


def test_flux_generate_takes_the_shift_of_its_image_size(folders):
    """Other sizes: the shift of their token count (as FluxPipeline's), the sigmas still the teacher's."""
    from hypersd.inference.generator import Generator

    gen = Generator(str(folders["flux"]), steps=2, device="cpu", width=2 * SIDE, height=SIDE)
    assert gen.latent_shape == (16, LATENT_SIZE, 2 * LATENT_SIZE)
    assert gen.teacher.schedule.shift == pytest.approx(flux_shift(LATENT_SIZE ** 2 // 2))
    images = gen.images(["a cat"], [1])
    assert images.shape == (1, 3, SIDE, 2 * SIDE)
    with pytest.raises(HypersdError, match="--width 18 is not a positive multiple of 4"):
        Generator(str(folders["sd3"]), steps=2, device="cpu", width=18)
    with pytest.raises(HypersdError, match="needs --scheduler tcd"):
        Generator(str(folders["sd3"]), steps=2, device="cpu", scheduler="ddim", eta=0.5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_with_eta_is_hypersd_tcd_sampler(folders, kind):
    """--eta > 0 on SD3/FLUX: the pipeline's scheduler steps with hypersd's TCD step, each image's
    re-noising from its own seed's generator, so the images are ``sample_tcd``'s at that eta."""
    from hypersd.inference.generator import Generator

    prompts, seeds, k = ["a cat", "a red house"], [5, 9], 4
    got = {}
    for eta in (0.3, 1.0):
        gen = Generator(str(folders[kind]), steps=k, guidance=2.0, scheduler="tcd", eta=eta, device="cpu",
                        width=SIDE, height=SIDE)
        assert gen.plan.scheduler == "tcd" and gen.plan.eta == eta
        got[eta] = gen.images(prompts, seeds)
        ref = reference_images(gen.teacher, prompts, seeds, k, 2.0, gen.latent_shape, eta=eta)
        assert (got[eta] - ref).abs().max() < 1e-5
        assert (gen.images(prompts[1:], seeds[1:]) - got[eta][1:]).abs().max() < 1e-5  # its seed alone, not its batch
    euler = reference_images(gen.teacher, prompts, seeds, k, 2.0, gen.latent_shape)
    assert (got[0.3] - euler).abs().max() > 1e-3 and (got[1.0] - got[0.3]).abs().max() > 1e-3  # eta mattered


def test_generate_command_detects_sd3(folders, tmp_path):
    from PIL import Image

    from hypersd.cli import main

    out = tmp_path / "images"
    assert main(["generate", "--model", str(folders["sd3"]), "--prompt", "a cat", "--steps", "1", "--width",
                 str(SIDE), "--height", str(SIDE), "--device", "cpu", "--out", str(out), "--quiet"]) in (0, None)
    png = Image.open(out / "00000.png")
    assert png.size == (SIDE, SIDE) and '"backbone": "sd3"' in png.text["hypersd"]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_the_boundaries_are_the_pipelines_own_k_step_sigmas(folders, kind, k):
    """SD3's "inclusive" grid holds set_timesteps(k)'s sigmas, FLUX's "trailing" one FluxPipeline's
    default linspace(1, 1/k, k): a pipeline given only a step count samples hypersd's boundaries."""
    t, pipe = teacher(folders, kind), pipeline(folders, kind)
    noise, got = ours(t, k, 1.0)
    lat = noise if kind == "sd3" else pack(noise)
    ref = pipe(prompt=PROMPTS, latents=lat, guidance_scale=1.0, num_inference_steps=k, height=SIDE, width=SIDE,
               max_sequence_length=T5_LENGTH, output_type="latent").images
    ref = ref if kind == "sd3" else unpack(ref, LATENT_SIZE, LATENT_SIZE)
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_single_checkpoint_gives_the_transformer_and_its_config_the_rest(folders, kind, tmp_path):
    from flow_tiny import tiny_flux_pipeline, tiny_sd3_pipeline
    from safetensors.torch import save_file

    other = (tiny_sd3_pipeline if kind == "sd3" else tiny_flux_pipeline)(seed=1).transformer
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(file))
    backbone = "sd3" if kind == "sd3" else "flux"
    opts = {"max_sequence_length": T5_LENGTH} | ({} if kind == "sd3" else {"resolution": SIDE})
    t = load_teacher(backbone, str(file), config=str(folders[kind]), **opts)
    for (name, got), want in zip(t.unet.state_dict().items(), other.state_dict().values()):
        assert torch.equal(got, want), name  # the file's weights, not the config folder's
    ref = teacher(folders, kind)
    assert torch.equal(t.encode_prompt(PROMPTS).hidden, ref.encode_prompt(PROMPTS).hidden)
    with pytest.raises(HypersdError, match="--model-config"):
        load_teacher(backbone, str(file))
    wrong = "flux" if kind == "sd3" else "sd3"
    with pytest.raises(HypersdError, match=f"use backbone {backbone}"):
        load_teacher(wrong, str(file), config=str(folders[kind]))


def test_a_flux_loras_recommended_eta_runs_tcd_with_its_weights(folders, tmp_path):
    """A hypersd FLUX LoRA recording a recommended eta at 4 steps: generate samples it at that eta
    (TCD through the pipeline, the LoRA fused) as hypersd's sampler does with the LoRA attached."""
    from hypersd import lora
    from hypersd.inference.generator import Generator

    t = teacher(folders, "flux")
    path = save_random_lora(t.unet, tmp_path / "lora.safetensors",
                            {"kind": "hypersd-lora", "backbone": "flux", "guidance": 2.0, "resolution": [SIDE, SIDE],
                             "max_sequence_length": T5_LENGTH, "recommended_eta": {"4": 0.5}},
                            targets="transformer", std=0.2)
    gen = Generator(str(folders["flux"]), lora=str(path), steps=4, device="cpu")
    assert (gen.plan.scheduler, gen.plan.eta, gen.plan.guidance) == ("tcd", 0.5, 2.0)
    images = gen.images(["a cat"], [3])
    ref = reference_images(t, ["a cat"], [3], 4, 2.0, gen.latent_shape, eta=0.5)
    assert (images - ref).abs().max() < 1e-4
    lora.remove_lora(t.unet, lora.STUDENT)
    assert (images - reference_images(t, ["a cat"], [3], 4, 2.0, gen.latent_shape, eta=0.5)).abs().max() > 1e-3
    assert Generator(str(folders["flux"]), lora=str(path), steps=2, device="cpu").plan.eta == 0.0  # none at 2
    # a one-step timestep counts on the T it records; a FLUX file without one counted on 1000
    meta = {"kind": "hypersd-lora", "backbone": "flux", "resolution": [SIDE, SIDE], "one_step_t": 800}
    lora.add_lora(t.unet, lora.lora_config(4, 8, "transformer"))
    lora.save_lora(path, t.unet, {**meta, "T": 1200})
    assert Generator(str(folders["flux"]), lora=str(path), steps=1, device="cpu").plan.timesteps == [800]
    lora.save_lora(path, t.unet, meta)
    with pytest.raises(HypersdError, match="one-step timestep 800 on T=1000, this model's timesteps on T=1200"):
        Generator(str(folders["flux"]), lora=str(path), steps=1, device="cpu")


def _variant(folder, tmp_path, name, pipeline=None, in_channels=None):
    """A copy of a tiny model folder posing as another FLUX variant, its transformer weights damaged:
    a refusal that comes before any weight is read gives its own message, not a load error."""
    import json
    import shutil

    out = tmp_path / name
    shutil.copytree(folder, out)
    if pipeline:
        index = json.loads((out / "model_index.json").read_text())
        (out / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    if in_channels:
        config = json.loads((out / "transformer" / "config.json").read_text())
        (out / "transformer" / "config.json").write_text(json.dumps({**config, "in_channels": in_channels}))
    for weights in (out / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"damaged")
    return out


@pytest.mark.parametrize("pipeline, said", [("FluxKontextPipeline", "FLUX.1 Kontext, an image-editing model"),
                                            ("FluxFillPipeline", "FLUX.1 Fill, an inpainting model"),
                                            ("FluxControlPipeline", "Depth or Canny")])
def test_a_flux_variant_that_is_no_text_to_image_model_is_refused_before_loading(folders, tmp_path, pipeline, said):
    folder = _variant(folders["flux"], tmp_path, pipeline, pipeline=pipeline)
    with pytest.raises(HypersdError, match=f"{said}.*hypersd distils text-to-image models: pass FLUX.1-dev"):
        load_teacher("flux", str(folder), resolution=SIDE)


def test_a_redux_folder_is_refused_by_its_pipeline_before_anything_loads(folders, tmp_path):
    import json

    redux = tmp_path / "redux"
    redux.mkdir()  # a Redux folder holds an image encoder and an embedder, no transformer
    (redux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPriorReduxPipeline"}))
    with pytest.raises(HypersdError, match="FLUX.1 Redux, an image-variation adapter"):
        load_teacher("flux", str(redux), resolution=SIDE)


def test_a_single_file_wider_than_its_configs_vae_is_refused_from_its_header(folders, tmp_path):
    """A Fill / Depth checkpoint named with a dev config: its patch embedding's width (read from the
    safetensors header, in BFL's layout or diffusers') tells it, before from_single_file runs."""
    from safetensors.torch import save_file

    for key in ("img_in.weight", "model.diffusion_model.img_in.weight", "x_embedder.weight"):
        file = tmp_path / f"{key}.safetensors"
        save_file({key: torch.zeros(32, 128)}, str(file))
        with pytest.raises(HypersdError, match="takes 128 input channels, not the 64"):
            load_teacher("flux", str(file), config=str(folders["flux"]), resolution=SIDE)


def test_a_transformer_wider_than_its_vaes_latents_is_refused_before_loading(folders, tmp_path):
    """A Fill or Depth transformer saved under FluxPipeline: its input width tells it (tiny: 4 x 16)."""
    folder = _variant(folders["flux"], tmp_path, "wide", in_channels=128)
    with pytest.raises(HypersdError, match="takes 128 input channels, not the 64 of its VAE's 16-channel"):
        load_teacher("flux", str(folder), resolution=SIDE)
    folder = _variant(folders["sd3"], tmp_path, "sd3-wide", in_channels=32)
    with pytest.raises(HypersdError, match="takes 32 input channels, not the 16.*pass SD3 / SD3.5"):
        load_teacher("sd3", str(folder))
