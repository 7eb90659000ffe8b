"""hypersd cache and distill on tiny SD3 and FLUX.1-dev teachers: the latent cache holds what each
transformer is conditioned on, every stage kind trains from it, and the final LoRA, exported in
diffusers' layout, gives diffusers' own pipeline (``load_lora_weights``) hypersd's sampler's images."""

import json
import math
import shutil

import pytest
import torch
import yaml
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from flow_tiny import LATENT_SIZE, T5_LENGTH, save_flow_tiny
from safetensors import safe_open
from sd_tiny import MAX_LENGTH
from test_imagedata import BAD_REASONS, write_folder
from test_train_sd import clip_reward  # noqa: F401  (a fixture)

from hypersd import lora
from hypersd.backbones import get_backbone
from hypersd.cli import main
from hypersd.core.sampling import guided, initial_noise, sample_tcd
from hypersd.data.cache import CachedData, build_cache, read_manifest
from hypersd.lora.layouts import write
from hypersd.teachers import load_teacher
from hypersd.teachers.flux import pack, unpack
from hypersd.train.recipe import from_dict, load_recipe
from hypersd.train.trainer import Distiller

SIDE = 2 * LATENT_SIZE
KINDS = ("sd3", "flux")


def teacher_of(kind, model, **kw):
    opts = {"max_sequence_length": T5_LENGTH} | ({"resolution": SIDE} if kind == "flux" else {})
    return load_teacher(kind, model, **opts, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """For each kind: (model folder, cache folder made from it): 6 good items in shards of 4 and 2."""
    root = tmp_path_factory.mktemp("flow")
    write_folder(root / "images", n_good=6)
    out = {}
    for kind in KINDS:
        model = str(save_flow_tiny(kind, root / kind))
        build_cache(kind, model, str(root / "images"), root / f"cache-{kind}", resolution=SIDE, shard_size=4,
                    max_sequence_length=T5_LENGTH, teacher=teacher_of(kind, model), progress=False)
        out[kind] = (model, root / f"cache-{kind}")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_cache_holds_the_transformers_conditioning(kind, setup):
    model, folder = setup[kind]
    m = read_manifest(folder)
    assert m["written"] == 6 and m["skipped"] == BAD_REASONS and m["latent_shape"] == [16, LATENT_SIZE, LATENT_SIZE]
    assert m["t5_length"] == T5_LENGTH and m["added"] == ["pooled_projections"]
    with safe_open(str(folder / m["shards"][0]["file"]), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert set(stored) == {"latents", "hidden", "pooled_projections"}  # FLUX's text ids are rebuilt per call
    # every byte of an item is counted: the latents and the prompt's tensors
    assert m["bytes_per_item"] == sum(v[0].numel() * v.element_size() for v in stored.values())
    t = teacher_of(kind, model)
    cached = CachedData(folder, kind).attach(t)
    z, prompts, cond = cached.batch_cond(3, torch.Generator().manual_seed(0))
    want = t.encode_prompt(prompts)
    clip = MAX_LENGTH if kind == "sd3" else 0  # SD3: the CLIPs' tokens (side by side), then T5's
    assert cond.hidden.shape == (3, clip + T5_LENGTH, 80) and set(cond.added) == {"pooled_projections"}
    assert (cond.hidden - want.hidden).abs().max() < 1e-2
    assert (cond.added["pooled_projections"] - want.added["pooled_projections"]).abs().max() < 1e-2
    # the latents are the VAE's after its own shift and scale, not the raw ones
    vae = t.vae.config
    assert (vae.shift_factor, vae.scaling_factor) != (0.0, 1.0) and z.shape == (3, 16, LATENT_SIZE, LATENT_SIZE)


def _stages(kind, clip):
    sd3 = kind == "sd3"  # SD3's timesteps are 0..840 (T = 841, inclusive)
    fb = {"name": "fb", "kind": "feedback", "rewards": [{"name": "clip", "path": clip, "weight": 0.1}],
          "sample_steps": [1, 2]}
    dmd = {"name": "d", "kind": "dmd", "fake_warmup": 1, "fake_updates": 1, "reg_pool": 2, "reg_steps": 2,
           "reg_batch": 1, "keep_weight": 1.0, "keep_batch": 2, "keep_steps": [2]}
    if sd3:
        fb |= {"t_range": [0, 840], "perceptual_t": [0, 840]}
        dmd |= {"generator_t": 840, "t_range": [20, 820]}
    else:  # FLUX's timesteps are 0..1199 (T = 1200, trailing)
        fb |= {"t_range": [0, 1199], "perceptual_t": [0, 1199]}
        dmd |= {"generator_t": 1199, "t_range": [24, 1176]}
    return [{"name": "t2", "segments": 2}, {"name": "t1", "segments": 1}, fb,
            {"name": "m", "kind": "merge", "ratio": 0.5}, dmd]


def _pipeline_latents(kind, model, path, prompts, noise, k, schedule, guidance):
    """diffusers' pipeline of the model with the diffusers-layout LoRA loaded by its own loader."""
    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    latents = noise if kind == "sd3" else pack(noise)
    out = pipe(prompt=prompts, latents=latents, guidance_scale=guidance, sigmas=schedule.pipeline_sigmas(k),
               height=SIDE, width=SIDE, max_sequence_length=T5_LENGTH, output_type="latent").images
    return out if kind == "sd3" else unpack(out, LATENT_SIZE, LATENT_SIZE)


@pytest.mark.parametrize("kind", KINDS)
def test_distill_every_stage_kind_and_the_pipeline_loads_the_lora(kind, setup, clip_reward, tmp_path):  # noqa: F811
    model, cache = setup[kind]
    data = tmp_path / "cache"
    shutil.copytree(cache, data)
    (data / read_manifest(data)["shards"][1]["file"]).write_bytes(b"damaged")  # its 2 items are skipped, counted
    recipe = {"backbone": kind, "teacher": model, "data": str(data), "resolution": SIDE, "lora_rank": 4,
              "grid_every_stage": False, "eval_steps": [1, 2], "checkpoint_every": 100,
              "stage_defaults": {"batch": 2, "steps": 2, **({"solver_steps": 43} if kind == "sd3" else {})},
              "stages": _stages(kind, clip_reward)}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "stats.json").read_text())["data"] == {"items": 4, "skipped": {"unreadable_shard": 2}}
    state, meta = lora.read_lora(out / "lora.safetensors")
    assert meta["backbone"] == kind and meta["rank"] == 8 and meta["max_sequence_length"] == T5_LENGTH  # TSCD's 4 + the merged feedback's 4
    assert meta["targets"] == sorted(lora.TARGET_PRESETS["transformer"])  # the default "all" became the preset
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it learned
    for m in (meta, lora.read_lora(out / "stages" / "t1" / "lora.safetensors")[1]):  # each stage's file too
        if kind == "flux":  # what generate samples it with: the embedding it was trained with, at its resolution
            assert m["guidance"] == 3.5 and m["resolution"] == [SIDE, SIDE] and m["T"] == 1200
        else:
            assert m["guidance"] == 1.0 and "resolution" not in m
    assert all((out / f"samples-{k}step.png").stat().st_size > 0 for k in (1, 2))

    exported = write(tmp_path / "diffusers.safetensors", state, meta, "diffusers")
    t = teacher_of(kind, model)
    lora.load_lora(t.unet, out / "lora.safetensors")
    prompts, k, s = ["a photo of thing 1", "a red cat"], 2, t.schedule
    noise, _ = initial_noise(2, t.latent_shape, 3)
    with torch.no_grad():
        ours = sample_tcd(guided(t, t.encode_prompt(prompts), meta["guidance"]), noise, s.inference_timesteps(k), s)
        lora.remove_lora(t.unet, lora.STUDENT)
        base = sample_tcd(guided(t, t.encode_prompt(prompts), meta["guidance"]), noise, s.inference_timesteps(k), s)
        theirs = _pipeline_latents(kind, model, exported, prompts, noise, k, s, meta["guidance"])
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the samples: the check below can fail
    assert (ours - theirs).abs().max() < 1e-4

    # hypersd generate with the LoRA alone: its guidance, T5 length and (FLUX) resolution from its metadata
    from hypersd.inference.generator import Generator

    gen = Generator(model, lora=str(out / "lora.safetensors"), steps=k, device="cpu")
    assert gen.plan.guidance == meta["guidance"] and gen.teacher.max_sequence_length == T5_LENGTH
    assert gen.teacher.resolution == (SIDE, SIDE)
    images = gen.images(prompts, [3, 3])
    lora.load_lora(t.unet, out / "lora.safetensors")
    with torch.no_grad():
        one, _ = initial_noise(1, t.latent_shape, 3)
        x = sample_tcd(guided(t, t.encode_prompt(prompts[:1]), meta["guidance"]), one, s.inference_timesteps(k), s)
        ref = t.decode(x)
    assert (images[:1] - ref).abs().max() < 1e-3

    # the same LoRA in kohya's layout (the original model's names, q, k, v fused), read back by generate
    kohya = write(tmp_path / "kohya.safetensors", state, meta, "kohya")
    with safe_open(str(kohya), "pt") as f:
        fused = "double_blocks_0_img_attn_qkv" if kind == "flux" else "joint_blocks_0_x_block_attn_qkv"
        assert f"lora_unet_{fused}.lora_up.weight" in set(f.keys())
    again = Generator(model, lora=str(kohya), steps=k, device="cpu").images(prompts, [3, 3])
    torch.testing.assert_close(again, images, atol=1e-6, rtol=0)


def test_flow_backbones_check_grids_on_the_loaded_teacher(setup, tmp_path):
    from hypersd.errors import HypersdError
    from hypersd.train.trainer import Distiller

    for kind in KINDS:
        assert get_backbone(kind).named_schedule() is None
    model, cache = setup["sd3"]
    r = {"backbone": "sd3", "teacher": model, "data": str(cache), "resolution": SIDE, "lora_rank": 4,
         "stages": [{"name": "t", "segments": 2, "steps": 1}]}  # solver_steps 40: not on SD3's 841-point grid
    with pytest.raises(HypersdError, match="solver_steps 40"):
        Distiller(from_dict(r), tmp_path, progress=False)
    model, cache = setup["flux"]
    r = {**r, "backbone": "flux", "teacher": model, "data": str(cache),
         "stages": [{"name": "t", "segments": 2, "steps": 1}, {"name": "d", "kind": "dmd", "guidance": 5.0}]}
    with pytest.raises(HypersdError, match="guidance 5 would become the student's guidance embedding"):
        Distiller(from_dict(r), tmp_path, progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_flow_recipes_train_the_adversarial_term(kind, setup, tmp_path):
    """TSCD's discriminator on the transformer's own blocks: both losses logged, finite, every step."""
    model, cache = setup[kind]
    r = {"backbone": kind, "teacher": model, "data": str(cache), "resolution": SIDE, "lora_rank": 4,
         "grid_every_stage": False, "eval_steps": [1],
         "stages": [{"name": "t", "segments": 2, "steps": 2, "batch": 2, "adv_weight": 0.05,
                     **({"solver_steps": 43} if kind == "sd3" else {})}]}
    assert Distiller(from_dict(r), tmp_path, progress=False).run()
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [s["losses"] for s in steps if s["kind"] == "step"]
    assert len(steps) == 2 and all(set(s) >= {"g", "d"} and all(map(math.isfinite, s.values())) for s in steps)


def test_packaged_flow_recipes():
    from hypersd.core.noise import FLUX_T, FlowSchedule
    from hypersd.train.recipe import check_timesteps

    schedules = {"sd3": FlowSchedule(shift=3.0, timestep_scale=1000.0, spacing="inclusive"),
                 "flux": FlowSchedule(shift=3.0, timestep_scale=1.0, spacing="trailing", T=FLUX_T)}
    for name, schedule in schedules.items():
        r = load_recipe(name)
        assert r.backbone == name and r.resolution == 1024 and r.lora_targets == "transformer"
        assert [s.kind for s in r.stages] == ["tscd"] * 5 + ["feedback", "merge", "dmd"]
        assert [s.segments for s in r.stages if s.kind == "tscd"] == [16, 8, 4, 2, 1]
        assert 16 in r.eval.steps and 16 in r.stages[-1].keep_steps
        assert r.stages[-1].generator_t == schedule.T - 1  # SD3's 840, FLUX's 1199
        check_timesteps(r, name, schedule)


# kind: (the 16-segment grid its recipe uses, generate's 16 timesteps, the recipe's grid for 1 to 8
# segments, which cannot hold 16, and its refusal)
SIXTEEN = {"sd3": (61, list(range(840, -1, -56)), 43, r"segments 16 with solver_steps 43: .*T=841.*e\.g\. N=106"),
           "flux": (48, list(range(1199, 0, -75)), 40, r"segments 16 with solver_steps 40: .*T=1200.*e\.g\. N=48")}


@pytest.mark.parametrize("kind", KINDS)
def test_tscd_at_16_segments_trains_on_the_boundaries_generate_samples(kind, setup, tmp_path, monkeypatch):
    """16 segments on SD3's T = 841 inclusive grid (N = 61) and FLUX's T = 1200 trailing grid
    (N = 48): every lower boundary TSCD draws its end point from is one of the 16 boundaries (or the
    clean end), and 'generate --steps 16' with the LoRA runs exactly those boundaries, the stock
    pipeline's 16-step sigmas; the recipes' default grids are refused when the teacher loads."""
    from hypersd.core.schedule import CLEAN
    from hypersd.errors import HypersdError
    from hypersd.inference.generator import Generator
    from hypersd.losses import tscd

    grid, timesteps, default_grid, refusal = SIXTEEN[kind]
    model, cache = setup[kind]
    seen = []
    monkeypatch.setattr(tscd, "draw_t_end", lambda lower, *a, f=tscd.draw_t_end: seen.append(lower) or f(lower, *a))
    r = {"backbone": kind, "teacher": model, "data": str(cache), "resolution": SIDE, "lora_rank": 4,
         "grid_every_stage": False, "eval_steps": [16],
         "stages": [{"name": "t16", "segments": 16, "solver_steps": grid, "steps": 3, "batch": 2}]}
    d = Distiller(from_dict(r), tmp_path / "run", progress=False)
    assert d.run()
    path = d.finish()
    assert (tmp_path / "run" / "samples-16step.png").stat().st_size > 0
    gen = Generator(model, lora=str(path), steps=16, device="cpu")
    lowers = set(torch.cat(seen).tolist())
    assert len(seen) == 3 and lowers <= set(gen.plan.timesteps[1:]) | {CLEAN}
    assert gen.plan.timesteps == timesteps
    assert gen.images(["a cat"], [0]).std() > 0.01
    bad = {**r, "stages": [{"name": "t", "segments": 16, "solver_steps": default_grid, "steps": 1}]}
    with pytest.raises(HypersdError, match=refusal):
        Distiller(from_dict(bad), tmp_path / "bad", progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_without_t5_encodes_it_each_step(kind, setup, tmp_path, monkeypatch, capsys):
    from hypersd.train.trainer import Distiller

    model, full = setup[kind]
    t = teacher_of(kind, model)
    write_folder(tmp_path / "images", n_good=3)
    assert main(["cache", "--backbone", kind, "--model", model, "--data", str(tmp_path / "images"), "--out",
                 str(tmp_path / "c"), "--resolution", str(SIDE), "--max-sequence-length", str(T5_LENGTH),
                 "--no-t5-cache", "--device", "cpu", "--quiet"]) == 0
    assert "wrote 3 items at 16px in 1 shards" in capsys.readouterr().out
    m = read_manifest(tmp_path / "c")
    assert m["bytes_per_item"] < read_manifest(full)["bytes_per_item"]  # T5's states are not stored
    with safe_open(str(tmp_path / "c" / m["shards"][0]["file"]), "pt") as f:
        stored = set(f.keys())
    assert stored == ({"latents", "hidden", "pooled_projections"} if kind == "sd3" else {"latents", "pooled_projections"})
    if kind == "sd3":  # the CLIP tokens alone, as wide as the two CLIPs (2 x 32), not T5's 80
        assert m["hidden_shape"] == [MAX_LENGTH, 64]
    cached = CachedData(tmp_path / "c", kind).attach(t)
    _, prompts, cond = cached.batch_cond(2, torch.Generator().manual_seed(0))
    want = t.encode_prompt(prompts)
    assert cond.hidden.shape == want.hidden.shape and (cond.hidden - want.hidden).abs().max() < 1e-2
    assert torch.equal(cond.hidden[:, -T5_LENGTH:], t.encode_t5(prompts))  # encoded now, not rounded to float16
    calls = []
    monkeypatch.setattr(t, "encode_t5", lambda p, f=t.encode_t5: calls.append(len(p)) or f(p))
    r = {"backbone": kind, "teacher": model, "data": str(tmp_path / "c"), "resolution": SIDE, "lora_rank": 4,
         "eval_steps": [1], "grid_every_stage": False,
         "stage_defaults": {"batch": 2, "steps": 2, **({"solver_steps": 43} if kind == "sd3" else {})},
         "stages": [{"name": "t", "segments": 2}]}
    d = Distiller(from_dict(r), tmp_path / "run", progress=False, teacher=t)
    assert d.run() and calls.count(2) >= 2  # each training batch's T5 states


def _single_file(kind, path):
    """Another tiny transformer of the kind (seed 1) as one .safetensors checkpoint (diffusers' key
    names, which from_single_file takes as they are): its configs and text encoders must come from
    a config folder."""
    from flow_tiny import tiny_flux_pipeline, tiny_sd3_pipeline
    from safetensors.torch import save_file

    net = (tiny_sd3_pipeline if kind == "sd3" else tiny_flux_pipeline)(seed=1).transformer
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_file_teacher_trains_with_its_config_named_in_the_recipe(kind, setup, tmp_path):
    """teacher: one checkpoint, teacher_config: the diffusers folder it lacks (offline, diffusers
    cannot fetch one); without it, or with a config found nowhere, one line naming teacher_config."""
    from hypersd.errors import HypersdError

    model, cache = setup[kind]
    file, net = _single_file(kind, tmp_path / "model.safetensors")
    r = {"backbone": kind, "teacher": str(file), "teacher_config": model, "data": str(cache), "resolution": SIDE,
         "lora_rank": 4, "grid_every_stage": False, "eval_steps": [1],
         "stages": [{"name": "t", "segments": 2, "steps": 1, "batch": 2,
                     **({"solver_steps": 43} if kind == "sd3" else {})}]}
    d = Distiller(from_dict(r), tmp_path / "run", progress=False)
    got = d.teacher.unet.norm_out.linear.weight  # a layer no LoRA adapts: the file's, not the folder's
    assert torch.equal(got, net.norm_out.linear.weight)
    assert not torch.equal(got, teacher_of(kind, model).unet.norm_out.linear.weight)
    assert d.run() and (tmp_path / "run" / "stages" / "t" / "lora.safetensors").is_file()
    with pytest.raises(HypersdError, match="teacher_config"):
        Distiller(from_dict({**r, "teacher_config": None}), tmp_path / "run2", progress=False)
    with pytest.raises(HypersdError, match="neither in the hub cache.*teacher_config"):
        Distiller(from_dict({**r, "teacher_config": "nobody/no-such-model"}), tmp_path / "run3", progress=False)
    with pytest.raises(HypersdError, match="is no file"):  # a folder has its own configs: nothing to name
        Distiller(from_dict({**r, "teacher": model}), tmp_path / "run5", progress=False)
    with pytest.raises(HypersdError, match="drop teacher_config"):
        get_backbone("sd15").load_teacher(from_dict({**r, "backbone": "sd15", "stages": [{"name": "t"}]}), "cpu",
                                          None)
    (tmp_path / "empty" / "transformer").mkdir(parents=True)
    with pytest.raises(HypersdError, match="no readable transformer/config.json.*teacher_config"):
        Distiller(from_dict({**r, "teacher_config": str(tmp_path / "empty")}), tmp_path / "run4", progress=False)


def test_cache_of_a_single_file_model_takes_its_config(setup, tmp_path):
    from hypersd.errors import HypersdError

    model, _ = setup["flux"]
    file, _ = _single_file("flux", tmp_path / "flux.safetensors")
    images = tmp_path / "images"
    write_folder(images, n_good=2)
    args = ["cache", "--backbone", "flux", "--model", str(file), "--data", str(images), "--resolution", str(SIDE),
            "--max-sequence-length", str(T5_LENGTH), "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "c"), "--model-config", model]) in (0, None)
    m = read_manifest(tmp_path / "c")
    assert m["written"] == 2 and m["model_config"] == model
    with pytest.raises(HypersdError, match="--model-config"):
        build_cache("flux", str(file), str(images), tmp_path / "d", resolution=SIDE, progress=False)


def test_sd3_preserve_trains_a_cfg_lora_that_generate_samples_with_cfg(setup, tmp_path):
    """``cfg: preserve`` on SD3 (real CFG): the LoRA records its guidance and CFG, and generate samples
    it with two passes a step at that guidance, as hypersd's guided sampler does."""
    from hypersd.inference.generator import Generator

    model, cache = setup["sd3"]
    recipe = {"backbone": "sd3", "teacher": model, "data": str(cache), "resolution": SIDE, "lora_rank": 4,
              "grid_every_stage": False, "eval_steps": [2], "checkpoint_every": 100, "cfg": "preserve",
              "cfg_guidance": 4.0, "stage_defaults": {"batch": 2, "steps": 2, "solver_steps": 43},
              "stages": [{"name": "t2", "segments": 2}]}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg), "--out", str(out), "--quiet", "--no-eval"]) == 0
    _, meta = lora.read_lora(out / "lora.safetensors")
    assert (meta["cfg"], meta["guidance"]) == ("preserve", 4.0)
    gen = Generator(model, lora=str(out / "lora.safetensors"), steps=2, device="cpu")
    assert (gen.plan.cfg, gen.plan.guidance, gen.plan.passes) == ("preserve", 4.0, 2)
    images = gen.images(["a red cat"], [3])
    t = teacher_of("sd3", model)
    lora.load_lora(t.unet, out / "lora.safetensors")
    noise, _ = initial_noise(1, t.latent_shape, 3)
    s = t.schedule
    with torch.no_grad():
        ref = t.decode(sample_tcd(guided(t, t.encode_prompt(["a red cat"]), 4.0), noise, s.inference_timesteps(2), s))
        cond_only = t.decode(sample_tcd(guided(t, t.encode_prompt(["a red cat"]), 1.0), noise, s.inference_timesteps(2), s))
    assert (ref - cond_only).abs().max() > 1e-3  # the guidance matters: the check below can fail
    assert (images - ref).abs().max() < 1e-3
