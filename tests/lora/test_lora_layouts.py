"""LoRA files in hypersd's, diffusers' and kohya's layouts: round trips, mismatch messages, the
``hypersd lora`` command, and diffusers' pipeline giving our sampler's images from either export."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_tiny import save_tiny

from hypersd import lora
from hypersd.cli import main
from hypersd.cli.lora import FORMATS as CLI_FORMATS
from hypersd.core.sampling import guided, initial_noise, sample_tcd
from hypersd.core.schedule import inference_timesteps
from hypersd.errors import HypersdError
from hypersd.lora.layouts import FORMATS, load_into_unet, read_any, write
from hypersd.losses.tscd import ConsistencyConfig, ConsistencyStep
from hypersd.teachers import load_teacher

PROMPTS = ["a photo of a cat", "a lighthouse at dusk"]
PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
GUIDANCE = {"sd15": 1.0, "sdxl": 0.0}  # both mean "no classifier-free guidance" to the pipelines
RANK, ALPHA = 4, 8.0  # alpha/rank = 2: folding it into B (diffusers) is exact in floating point
_CACHE = {}


def _trained(kind, tmp_path_factory):
    """(model folder, teacher whose UNet carries a trained ``student`` adapter, its state, its meta).

    Three TSCD steps on random latents: enough for a LoRA that visibly changes the images."""
    if kind in _CACHE:
        return _CACHE[kind]
    folder = save_tiny(kind, tmp_path_factory.mktemp(kind) / "model")
    teacher = load_teacher(kind, str(folder))
    for name in (lora.STUDENT, lora.EMA):
        lora.add_lora(teacher.unet, lora.lora_config(RANK, ALPHA, "all"), name)
    lora.activate(teacher.unet, lora.STUDENT, trainable=(lora.STUDENT,))
    step = ConsistencyStep(teacher, ConsistencyConfig(segments=4))
    cond, uncond = teacher.encode_prompt(PROMPTS), teacher.empty_cond(len(PROMPTS))
    opt = torch.optim.AdamW(lora.adapter_params(teacher.unet, lora.STUDENT), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        pred, tgt, _ = step(torch.randn(len(PROMPTS), *teacher.latent_shape, generator=g), cond, uncond, g)
        opt.zero_grad()
        step.loss(pred, tgt).backward()
        opt.step()
    lora.remove_lora(teacher.unet, lora.EMA)
    teacher.unet.set_adapter(lora.STUDENT)
    teacher.unet.requires_grad_(False)
    state = lora.get_state(teacher.unet)
    assert all(v.abs().max() > 0 for k, v in state.items() if ".lora_B." in k)  # trained, not zero
    meta = {**lora.spec(teacher.unet, lora.STUDENT), "backbone": kind, "guidance": 1.0, "stage": "tscd-4"}
    _CACHE[kind] = folder, teacher, state, meta
    return _CACHE[kind]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tmp_path_factory):
    return (request.param, *_trained(request.param, tmp_path_factory))


def _eps(teacher, name=lora.STUDENT):
    """The UNet's ε with adapter ``name`` on, on fixed inputs."""
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    if not lora.has_adapters(teacher.unet):
        with torch.no_grad():
            return teacher.eps(x, 600, teacher.encode_prompt(PROMPTS))
    with torch.no_grad(), lora.adapter(teacher.unet, name):
        return teacher.eps(x, 600, teacher.encode_prompt(PROMPTS))


def _with_loaded(teacher, path, name="check"):
    """ε with the file at ``path`` loaded as its own adapter, and the meta it read; then removed again."""
    meta = load_into_unet(teacher.unet, path, name)
    try:
        return _eps(teacher, name), meta
    finally:
        lora.remove_lora(teacher.unet, name)
        teacher.unet.set_adapter(lora.STUDENT)


def _pipeline(kind, folder):
    """diffusers' own pipeline from the saved folder, DDIM trailing whose last step returns x0 (ᾱ = 1),
    as our sampler's does; loaded once per model, and without the LoRAs earlier tests gave it."""
    key = ("pipe", kind)
    if key not in _CACHE:
        extra = {"add_watermarker": False} if kind == "sdxl" else {}
        pipe = PIPELINES[kind].from_pretrained(folder, **extra)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True, clip_sample=False)
        pipe.set_progress_bar_config(disable=True)
        _CACHE[key] = pipe
    _CACHE[key].unload_lora_weights()
    return _CACHE[key]


def _pipe_eps(pipe, teacher):
    """The pipeline's UNet on the inputs of ``_eps``."""
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = teacher.encode_prompt(PROMPTS)
    kw = {"added_cond_kwargs": cond.added} if cond.added else {}
    with torch.no_grad():
        return pipe.unet(x, torch.full((2,), 600), encoder_hidden_states=cond.hidden, **kw).sample


# -- the issue's end-to-end check ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_pipeline_with_the_export_gives_our_samplers_images(trained, fmt, tmp_path):
    kind, folder, teacher, state, meta = trained
    path = write(tmp_path / f"{fmt}.safetensors", state, meta, fmt)
    pipe = _pipeline(kind, folder)
    pipe.load_lora_weights(str(path))
    cond = teacher.encode_prompt(PROMPTS)
    for k in (1, 4):
        noise, _ = initial_noise(len(PROMPTS), teacher.latent_shape, seed=10 + k)
        with torch.no_grad():
            x0 = sample_tcd(guided(teacher, cond, 1.0), noise, inference_timesteps(k), teacher.alphas_cumprod)
            ours = (teacher.decode(x0) + 1) / 2
            theirs = pipe(PROMPTS, num_inference_steps=k, guidance_scale=GUIDANCE[kind], latents=noise.clone(),
                          output_type="pt").images
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    with torch.no_grad(), lora.adapters_disabled(teacher.unet):  # the LoRA is what made these images
        base = (teacher.decode(sample_tcd(guided(teacher, cond, 1.0), noise, inference_timesteps(4),
                                          teacher.alphas_cumprod)) + 1) / 2
    assert (base - ours).abs().max() > 1e-2


# -- layouts -----------------------------------------------------------------------------------------
def test_each_layout_loads_back_with_exactly_the_same_effect(trained, tmp_path):
    kind, _, teacher, state, meta = trained
    want = _eps(teacher)
    for fmt in FORMATS:
        path = write(tmp_path / f"{fmt}.safetensors", state, meta, fmt)
        got, back = _with_loaded(teacher, path)
        assert torch.equal(got, want), fmt
        assert back["rank"] == RANK and back["alpha"] == (RANK if fmt == "diffusers" else ALPHA)
        assert back["targets"] == meta["targets"] and back["guidance"] == 1.0 and back["backbone"] == kind
        state_back, _ = read_any(path)
        assert set(state_back) == set(state)
    # the file names each layer as its layout says
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(kohya[f"{name}.lora_down.weight"],
                       state["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert kohya[f"{name}.alpha"].item() == ALPHA
    # a 3x3 convolution as kohya's LoCon: the kernel in the down weight, a 1x1 up weight
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert kohya[f"{conv}.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert kohya[f"{conv}.lora_up.weight"].shape == (32, RANK, 1, 1)
    with safe_open(str(tmp_path / "kohya.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["ss_network_dim"] == str(RANK) and header["ss_network_alpha"] == "8"
    assert header["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[kind]
    diffusers = load_file(str(tmp_path / "diffusers.safetensors"))
    key = "down_blocks.1.attentions.0.proj_in.lora_B.weight"
    assert torch.equal(diffusers[f"unet.{key}"], state[key] * (ALPHA / RANK))  # alpha/rank folded in


def test_convert_chain_through_every_layout_keeps_the_effect(tmp_path, tmp_path_factory, capsys):
    _, teacher, state, meta = _trained("sd15", tmp_path_factory)
    start = write(tmp_path / "a.safetensors", state, meta, "hypersd")
    chain = [("a", "kohya"), ("b", "diffusers"), ("c", "kohya"), ("d", "hypersd")]
    for i, (src, fmt) in enumerate(chain):
        dst = tmp_path / f"{'bcde'[i]}.safetensors"
        assert main(["lora", "convert", str(tmp_path / f"{src}.safetensors"), str(dst), "--to", fmt]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torch.equal(_with_loaded(teacher, tmp_path / "e.safetensors")[0], _with_loaded(teacher, start)[0])
    # the hypersd file a round trip ends with also loads with the plain hypersd loader
    lora.load_lora(teacher.unet, tmp_path / "e.safetensors", "plain")
    assert torch.equal(_eps(teacher, "plain"), _eps(teacher))
    lora.remove_lora(teacher.unet, "plain")
    teacher.unet.set_adapter(lora.STUDENT)


def test_a_lora_diffusers_saved_keeps_the_alpha_it_records(tmp_path, tmp_path_factory):
    """diffusers' own save_lora_weights keeps alpha in its adapter metadata, B unfolded."""
    from peft.utils import get_peft_model_state_dict

    folder, teacher, state, meta = _trained("sd15", tmp_path_factory)
    pipe = _pipeline("sd15", folder)
    pipe.load_lora_weights(str(write(tmp_path / "k.safetensors", state, meta, "kohya")), adapter_name="x")
    config = pipe.unet.peft_config["x"]
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "saved", get_peft_model_state_dict(pipe.unet, adapter_name="x"),
                                              unet_lora_adapter_metadata=config.to_dict())
    saved = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    state_back, back = read_any(saved)
    assert back["alpha"] == ALPHA and torch.equal(state_back[next(k for k in state if ".lora_B." in k)],
                                                  state[next(k for k in state if ".lora_B." in k)])
    assert torch.equal(_with_loaded(teacher, saved)[0], _eps(teacher))


def _sgm_path(module: str) -> str:
    """The original (LDM) UNet's name of a diffusers layer, for a UNet with 2 resnets per down block:
    how kohya's SDXL trainer names layers."""
    p = module.split(".")
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    if p[0] == "mid_block":
        block = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[(p[1], p[2])]
        rest = [resnet[p[3]]] if p[1] == "resnets" else p[3:]
        return ".".join(["middle_block", block, *rest])
    b, kind, j = int(p[1]), p[2], int(p[3])
    head = f"input_blocks.{1 + 3 * b + j}" if p[0] == "down_blocks" else f"output_blocks.{3 * b + j}"
    rest = [resnet[p[4]]] if kind == "resnets" else p[4:]
    return ".".join([head, "0" if kind == "resnets" else "1", *rest])


def test_kohya_sdxl_trainer_naming_loads_here_as_in_diffusers(tmp_path, tmp_path_factory):
    folder, teacher, state, meta = _trained("sdxl", tmp_path_factory)
    kohya = load_file(str(write(tmp_path / "k.safetensors", state, meta, "kohya")))
    renamed = {}
    for key, value in kohya.items():
        name, part = key.split(".", 1)
        module = [m for m in (k.rsplit(".lora_", 1)[0] for k in state) if "lora_unet_" + m.replace(".", "_") == name][0]
        renamed[f"lora_unet_{_sgm_path(module).replace('.', '_')}.{part}"] = value
    assert any("input_blocks_4_1" in k for k in renamed) and any("middle_block_2" in k for k in renamed)
    save_file(renamed, str(tmp_path / "sgm.safetensors"))  # no hypersd metadata: a foreign file
    got, back = _with_loaded(teacher, tmp_path / "sgm.safetensors")
    assert torch.equal(got, _eps(teacher))
    assert back["rank"] == RANK and back["alpha"] == ALPHA and len(back["targets"]) == len(state) // 2
    pipe = _pipeline("sdxl", folder)
    pipe.load_lora_weights(str(tmp_path / "sgm.safetensors"))
    torch.testing.assert_close(_pipe_eps(pipe, teacher), got, atol=1e-5, rtol=0)


def test_layer_by_layer_ranks_and_alphas_become_one_adapter_with_the_same_effect(tmp_path, tmp_path_factory):
    """Files that give each layer its own rank and alpha: folded and zero-padded to one rank. The
    reference is peft itself with a rank and alpha per layer."""
    _, teacher, state, meta = _trained("sd15", tmp_path_factory)
    kohya = load_file(str(write(tmp_path / "k.safetensors", state, meta, "kohya")))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    cut = modules[::2]  # every other layer: rank 2, alpha 3
    ref_state = dict(state)
    for module in cut:
        name = "lora_unet_" + module.replace(".", "_")
        for part, key, rows in (("lora_down", "lora_A", slice(0, 2)), ("lora_up", "lora_B", None)):
            w = kohya[f"{name}.{part}.weight"]
            w = (w[:2] if rows else w[:, :2]).contiguous()
            kohya[f"{name}.{part}.weight"] = ref_state[f"{module}.{key}.weight"] = w
        kohya[f"{name}.alpha"] = torch.tensor(3.0)
    save_file(kohya, str(tmp_path / "mixed.safetensors"))
    got, back = _with_loaded(teacher, tmp_path / "mixed.safetensors")
    assert back["rank"] == RANK and back["alpha"] == RANK

    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules, rank_pattern={m: 2 for m in cut},
                        alpha_pattern={m: 3.0 for m in cut})
    lora.add_lora(teacher.unet, config, "ref")
    set_peft_model_state_dict(teacher.unet, ref_state, adapter_name="ref")
    want = _eps(teacher, "ref")
    lora.remove_lora(teacher.unet, "ref")
    teacher.unet.set_adapter(lora.STUDENT)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, _eps(teacher), atol=1e-3)  # the cut layers did change


# -- what does not fit -------------------------------------------------------------------------------
def test_a_lora_for_another_unet_is_refused_listing_what_does_not_match(tmp_path, tmp_path_factory):
    _, sd15, state, meta = _trained("sd15", tmp_path_factory)
    _, sdxl, _, _ = _trained("sdxl", tmp_path_factory)
    path = write(tmp_path / "sd15.safetensors", state, meta, "kohya")
    with pytest.raises(HypersdError) as err:
        load_into_unet(sdxl.unet, path, "other")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "does not fit this UNet" in message
    assert "missing" in message and "wrong shape" in message  # SDXL has more layers, wider cross-attention
    assert "other" not in sdxl.unet.peft_config and lora.active(sdxl.unet) == [lora.STUDENT]
    # a foreign file (no hypersd metadata) with one layer misnamed: that layer is named
    kohya = load_file(str(path))
    bad = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        kohya[f"{bad.replace('attn1', 'attn9')}.{part}"] = kohya.pop(f"{bad}.{part}")
    save_file(kohya, str(tmp_path / "typo.safetensors"))
    with pytest.raises(HypersdError, match=r"2 unexpected \(e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn9.to_q.lora_A"):
        load_into_unet(sd15.unet, tmp_path / "typo.safetensors", "other")
    assert "other" not in sd15.unet.peft_config


def test_files_that_are_no_lora_get_one_clear_line(tmp_path):
    cases = {
        "junk": (None, "not a readable safetensors"),
        "odd": ({"model.weight": torch.zeros(2)}, "unknown LoRA layout"),
        "text": ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2),
                  "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 2)}, "text-encoder"),
        "locon-mid": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 2),
                       "lora_unet_conv_in.lora_mid.weight": torch.zeros(2, 2)},
                      r"unknown LoRA layout \(e.g. key lora_unet_conv_in.lora_mid.weight\)"),
        "half": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 2)}, "lacks its lora_down or lora_up"),
        "sgm": ({"lora_unet_middle_block_7_proj_in.lora_down.weight": torch.zeros(2, 2),
                 "lora_unet_middle_block_7_proj_in.lora_up.weight": torch.zeros(2, 2)}, "names no UNet layer"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if tensors is None:
            path.write_bytes(b"\x80\x04 a pickle, say")
        else:
            save_file(tensors, str(path))
        with pytest.raises(HypersdError, match=message) as err:
            read_any(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(HypersdError, match="not found"):
        read_any(tmp_path / "none.safetensors")
    with pytest.raises(HypersdError, match="unknown LoRA format"):
        write(tmp_path / "x.safetensors", {}, {}, "ckpt")


# -- the command -------------------------------------------------------------------------------------
def test_cli_formats_are_the_modules():
    assert CLI_FORMATS == FORMATS


def test_convert_and_merge_never_overwrite_and_merge_adds_the_second_at_its_ratio(tmp_path, tmp_path_factory, capsys):
    _, teacher, state, meta = _trained("sd15", tmp_path_factory)
    a = write(tmp_path / "a.safetensors", state, meta, "kohya")
    # B: a diffusers file from elsewhere (no hypersd metadata), the same layers
    b = tmp_path / "b.safetensors"
    save_file(load_file(str(write(tmp_path / "d.safetensors", state, meta, "diffusers"))), str(b))
    out = tmp_path / "m.safetensors"
    assert main(["lora", "merge", str(a), str(b), "--ratio", "0.5", "--out", str(out)]) == 0
    merged, merged_meta = read_any(out)
    assert merged_meta["rank"] == 2 * RANK and merged_meta["guidance"] == 1.0 and merged_meta["merged"]["ratio"] == 0.5
    # A + 0.5·A is A with B scaled 1.5
    lora.add_lora(teacher.unet, lora.lora_config(RANK, ALPHA, meta["targets"]), "ref")
    lora.set_state(teacher.unet, {k: v * 1.5 if ".lora_B." in k else v for k, v in state.items()}, "ref")
    want = _eps(teacher, "ref")
    lora.remove_lora(teacher.unet, "ref")
    teacher.unet.set_adapter(lora.STUDENT)
    torch.testing.assert_close(_with_loaded(teacher, out)[0], want, atol=1e-5, rtol=0)

    before = out.read_bytes()
    assert main(["lora", "merge", str(a), str(b), "--out", str(out)]) == 2
    assert main(["lora", "convert", str(a), str(out), "--to", "kohya"]) == 2
    err = capsys.readouterr().err
    assert err.count("already exists; pass --force") == 2 and out.read_bytes() == before
    assert main(["lora", "convert", str(a), str(out), "--to", "kohya", "--force"]) == 0
    assert out.read_bytes() != before and not list(tmp_path.glob(".*tmp*"))


def test_fuse_writes_a_diffusers_model_whose_unet_is_the_student(tmp_path, tmp_path_factory, capsys):
    folder, teacher, state, meta = _trained("sd15", tmp_path_factory)
    path = write(tmp_path / "k.safetensors", state, meta, "kohya")
    out = tmp_path / "fused"
    args = ["lora", "fuse", "--backbone", "sd15", "--model", str(folder), "--lora", str(path), "--out", str(out)]
    assert main(args) == 0
    fused = load_teacher("sd15", str(out))
    assert not lora.has_adapters(fused.unet)
    torch.testing.assert_close(_eps(fused), _eps(teacher), atol=1e-5, rtol=0)
    note = json.loads((out / "hypersd_fused.json").read_text())
    assert note["scale"] == 1.0 and note["lora_meta"]["guidance"] == 1.0
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--scale", "0", "--force"]) == 0  # scale 0: the base model again
    with torch.no_grad(), lora.adapters_disabled(teacher.unet):
        x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(1))
        base = teacher.eps(x, 600, teacher.encode_prompt(PROMPTS))
    torch.testing.assert_close(_eps(load_teacher("sd15", str(out))), base, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".fused*"))
