"""LoRA files for SD3's and FLUX's transformers: the ``transformer`` target preset, diffusers' layout
read by diffusers' own pipelines, kohya's layout (the original models' names, q, k, v fused) read by
diffusers' kohya reader (FLUX) and by the original model's weight names (SD3, as ComfyUI applies them),
and exact round trips. Tiny transformers from configs; nothing is downloaded."""

import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hypersd import lora
from hypersd.cli import main
from hypersd.errors import HypersdError
from hypersd.lora.layouts import load_into_unet, read_any, write
from hypersd.lora.transformer_layouts import original_of

RANK, ALPHA = 4, 8.0
TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
# SD3.5's extra self-attention (attn2) and qk norms in block 0; the last block is context-pre-only
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=8, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def _net(arch, **changes):
    torch.manual_seed(0)
    if arch == "sd3":
        return SD3Transformer2DModel(**{**TINY_SD3, **changes}).eval()
    return FluxTransformer2DModel(**{**TINY_FLUX, **changes}).eval()


def _inputs(net):
    g = torch.Generator().manual_seed(1)
    cfg = net.config
    if isinstance(net, SD3Transformer2DModel):
        return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(2, 3, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([300.0, 700.0]))
    extra = {"guidance": torch.tensor([3.5, 3.5])} if cfg.guidance_embeds else {}
    return dict(hidden_states=torch.randn(2, 4, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(2, 3, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.3, 0.7]), img_ids=torch.randint(0, 4, (4, 3), generator=g).float(),
                txt_ids=torch.zeros(3, 3), **extra)


def _out(net):
    with torch.no_grad():
        return net(**_inputs(net)).sample


def _random_lora(net, name="ref", targets="transformer"):
    """A peft LoRA on ``net`` with random A and B (a fresh one has B = 0), active; (state, meta)."""
    lora.add_lora(net, lora.lora_config(RANK, ALPHA, targets), name)
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=g) * (0.3 if ".lora_B." in k else 1.0)
             for k, v in lora.get_state(net, name).items()}
    lora.set_state(net, state, name)
    net.set_adapter(name)
    backbone = "sd3" if isinstance(net, SD3Transformer2DModel) else "flux"
    return state, {**lora.spec(net, name), "guidance": 3.5, "backbone": backbone}


def _every_layer(net):
    """Every linear layer and convolution: the published Hyper-SD3 / Hyper-FLUX files adapt the
    embedders, the modulations (norm_out's included) and the final projection too."""
    return [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _pipe(net):
    """diffusers' own pipeline around the transformer alone: its LoRA loader needs nothing else."""
    if isinstance(net, SD3Transformer2DModel):
        return StableDiffusion3Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None, transformer=net)
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=net)


def _diffusers_out(net, path):
    """The transformer's output with the file loaded by ``pipe.load_lora_weights``; the LoRA is
    removed again after."""
    pipe = _pipe(net)
    pipe.load_lora_weights(str(path), adapter_name="theirs")
    try:
        return _out(net)
    finally:
        pipe.unload_lora_weights()


def _with_ours_removed(net, name="ref"):
    want = _out(net)
    lora.remove_lora(net, name)
    base = _out(net)
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the output: the checks below can fail
    return want


# -- the preset ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_transformer_preset_adapts_attention_feed_forward_and_flux_single_blocks(arch):
    net = _net(arch)
    assert lora.preset_for(net) == "transformer" and lora.preset_for(net, ["to_q"]) == ["to_q"]
    lora.add_lora(net, lora.lora_config(RANK, ALPHA, lora.preset_for(net)), "x")
    modules = {k.rsplit(".lora_", 1)[0] for k in lora.get_state(net, "x")}
    block = {m.split(".", 2)[2] for m in modules if m.startswith("transformer_blocks.0.")}
    want = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
            "ff_context.net.2"}
    if arch == "sd3":
        want |= {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}
    assert block == want
    if arch == "flux":
        single = {m.split(".", 2)[2] for m in modules if m.startswith("single_transformer_blocks.1.")}
        assert single == {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"}
    assert "proj_out" not in modules  # the final projection stays as it is
    assert lora.spec(net, "x")["targets"] == sorted(lora.TARGET_PRESETS["transformer"])
    lora.ensure_lora(net, "x", **lora.spec(net, "x"))  # the spec rebuilds the same adapter: kept
    assert {k.rsplit(".lora_", 1)[0] for k in lora.get_state(net, "x")} == modules


# -- diffusers' layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_diffusers_layout_loads_in_the_pipeline_with_the_same_output(arch, tmp_path):
    net = _net(arch)
    state, meta = _random_lora(net)
    path = write(tmp_path / "d.safetensors", state, meta, "diffusers")
    assert all(k.startswith("transformer.") for k in load_file(str(path)))
    want = _with_ours_removed(net)
    torch.testing.assert_close(_diffusers_out(net, path), want, atol=1e-5, rtol=0)


# -- kohya's layout -------------------------------------------------------------------------------
def test_kohya_flux_file_fuses_qkv_and_diffusers_kohya_reader_gives_the_same_output(tmp_path):
    """diffusers' reader of kohya's FLUX files hard-codes FLUX.1's width for the single blocks'
    linear1, so this tiny FLUX has double blocks only (the next test covers linear1)."""
    net = _net("flux", num_single_layers=0)
    state, meta = _random_lora(net)
    path = write(tmp_path / "k.safetensors", state, meta, "kohya")
    kohya = load_file(str(path))
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"
    down, up = kohya[f"{qkv}.lora_down.weight"], kohya[f"{qkv}.lora_up.weight"]
    assert down.shape == (3 * RANK, 32) and up.shape == (3 * 32, 3 * RANK)
    assert kohya[f"{qkv}.alpha"].item() == 3 * ALPHA  # alpha/rank as each part had it
    a = {p: state[f"transformer_blocks.1.attn.to_{p}.lora_A.weight"] for p in "qkv"}
    b = {p: state[f"transformer_blocks.1.attn.to_{p}.lora_B.weight"] for p in "qkv"}
    torch.testing.assert_close(up @ down, torch.cat([b[p] @ a[p] for p in "qkv"]), atol=0, rtol=0)
    assert "lora_unet_double_blocks_0_txt_mlp_2.lora_up.weight" in kohya
    assert not any("transformer" in k for k in kohya)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora_flux"
    want = _with_ours_removed(net)
    torch.testing.assert_close(_diffusers_out(net, path), want, atol=1e-5, rtol=0)


def test_a_kohya_flux_file_on_every_layer_is_what_diffusers_converter_reads_back(tmp_path, capsys):
    """norm_out's rows are (scale, shift) in diffusers, (shift, scale) in BFL's final_layer: the up's
    halves change places on export. diffusers' kohya FLUX converter (which swaps them back, and drops
    final_layer's alphas: so those ups carry alpha/rank) gives every layer's (alpha/rank)·B·A back.
    Its loader then loads only the blocks' layers: ``lora convert`` says so."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    net = _net("flux", num_single_layers=0)
    state, meta = _random_lora(net, targets=_every_layer(net))
    assert {"norm_out.linear.lora_B.weight", "proj_out.lora_B.weight", "x_embedder.lora_B.weight"} <= set(state)
    path = write(tmp_path / "h.safetensors", state, meta, "hypersd")
    assert main(["lora", "convert", str(path), str(tmp_path / "k.safetensors"), "--to", "kohya"]) in (0, None)
    assert "leave out 10 of these layers (context_embedder, norm_out.linear" in capsys.readouterr().out
    kohya = load_file(str(tmp_path / "k.safetensors"))
    up = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    b = state["norm_out.linear.lora_B.weight"] * (ALPHA / RANK)
    torch.testing.assert_close(up, torch.cat([b[32:], b[:32]]), atol=0, rtol=0)
    theirs = {k.removeprefix("transformer."): v for k, v in _convert_kohya_flux_lora_to_diffusers(kohya).items()}
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    assert {k.rsplit(".lora_", 1)[0] for k in theirs} == modules
    for m in modules:
        want = (ALPHA / RANK) * state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"]
        torch.testing.assert_close(theirs[f"{m}.lora_B.weight"] @ theirs[f"{m}.lora_A.weight"], want,
                                   atol=1e-5, rtol=1e-5, msg=m)
    want = _with_ours_removed(net)
    load_into_unet(net, tmp_path / "k.safetensors", "back")  # and hypersd's reader undoes the swap
    torch.testing.assert_close(_out(net), want, atol=1e-5, rtol=1e-5)


def test_kohya_flux_single_block_linear1_at_flux_width_loads_in_diffusers(tmp_path):
    """One single block of FLUX.1's width (3072, MLP 12288): linear1 fuses q, k, v and the MLP input."""
    net = _net("flux", num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
               axes_dims_rope=(16, 56, 56), guidance_embeds=False)
    state, meta = _random_lora(net, targets=["to_q", "to_k", "to_v", "proj_mlp", "proj_out", "!proj_out"])
    path = write(tmp_path / "k.safetensors", state, meta, "kohya")
    kohya = load_file(str(path))
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 4 * RANK)
    assert "lora_unet_single_blocks_0_linear2.lora_down.weight" in kohya
    want = _with_ours_removed(net)
    torch.testing.assert_close(_diffusers_out(net, path), want, atol=1e-5, rtol=0)


def _swap(w):
    """The original model's (shift, scale) as diffusers' AdaLayerNormContinuous's (scale, shift)."""
    return torch.cat(w.chunk(2)[::-1])


def _original_checkpoint(net):
    """The SD3 transformer's weights under the original (SAI) names, fused as the original model
    has them: hypersd's naming for every layer it maps, the few it does not spelled out here."""
    last = net.config.num_layers - 1
    rename = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
              "norm_out.linear": "final_layer.adaLN_modulation.1"}
    out, groups = {}, {}
    for key, value in net.state_dict().items():
        module, kind = key.rsplit(".", 1)
        path = module.split(".")
        if key in rename:
            out[rename[key]] = value
        elif module in rename:
            out[f"{rename[module]}.{kind}"] = _swap(value) if module == "norm_out.linear" else value
        elif path[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            side = "context_block" if "added" in path[-1] else "x_block"
            out[f"joint_blocks.{path[1]}.{side}.{path[2]}.ln_{path[-1][-1]}.{kind}"] = value
        elif module.endswith("norm1_context.linear"):  # the last block's is an AdaLayerNormContinuous
            out[f"joint_blocks.{path[1]}.context_block.adaLN_modulation.1.{kind}"] = (
                _swap(value) if int(path[1]) == last else value)
        else:
            orig, part, _ = original_of(module, "sd3")
            groups.setdefault(f"{orig}.{kind}", {})[part] = value
    for name, parts in groups.items():
        out[name] = torch.cat([parts[i] for i in range(len(parts))])
    return out


@pytest.mark.parametrize("every_layer", [False, True])
def test_kohya_sd3_names_are_the_original_models_and_applying_them_there_gives_the_lora(tmp_path, every_layer):
    """diffusers reads no kohya SD3 LoRA; ComfyUI applies ``lora_unet_<original weight name>`` to the
    original model's weight. Here: the original checkpoint maps back through diffusers' own SD3
    converter to the same weights (hypersd's names are the original model's), and the kohya file
    added to those weights, converted, gives the peft LoRA's output. On every layer: the patch
    embedding's convolution, norm_out and the last block's context modulation (whose halves the
    original orders (shift, scale)) too."""
    net = _net("sd3")
    original = _original_checkpoint(net)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())

    state, meta = _random_lora(net, targets=_every_layer(net) if every_layer else "transformer")
    path = write(tmp_path / "k.safetensors", state, meta, "kohya")
    kohya = load_file(str(path))
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in kohya
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight" in kohya
    if every_layer:
        assert {"lora_unet_x_embedder_proj.lora_down.weight", "lora_unet_final_layer_adaLN_modulation_1.alpha",
                "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"} <= set(kohya)
    patched = dict(original)
    for name in {k.split(".", 1)[0] for k in kohya}:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        weight = name[len("lora_unet_"):]
        target = next(k for k in original if k.endswith(".weight") and k[:-7].replace(".", "_") == weight)
        delta = (up.flatten(1) @ down.flatten(1)).view(original[target].shape)  # a convolution's too
        patched[target] = original[target] + kohya[f"{name}.alpha"] / down.shape[0] * delta
    want = _with_ours_removed(net)
    tol = 1e-5 * max(1.0, want.abs().max().item())  # a random LoRA on every layer: outputs near 1000
    fused = _net("sd3")
    fused.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(patched))
    torch.testing.assert_close(_out(fused), want, atol=tol, rtol=0)
    load_into_unet(net, path, "back")  # hypersd's reader: the same LoRA
    torch.testing.assert_close(_out(net), want, atol=tol, rtol=0)


# -- back into hypersd -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_hypersd_kohya_diffusers_hypersd_round_trip_is_exact(arch, tmp_path):
    net = _net(arch)
    state, meta = _random_lora(net)
    want = _out(net)
    start = write(tmp_path / "a.safetensors", state, meta, "hypersd")
    for src, dst, fmt in (("a", "b", "kohya"), ("b", "c", "hypersd"), ("c", "d", "diffusers"), ("d", "e", "kohya")):
        assert main(["lora", "convert", str(tmp_path / f"{src}.safetensors"), str(tmp_path / f"{dst}.safetensors"),
                     "--to", fmt]) == 0
    back, back_meta = read_any(tmp_path / "c.safetensors")  # hypersd -> kohya -> hypersd: bit for bit
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert (back_meta["rank"], back_meta["alpha"], back_meta["targets"]) == (RANK, ALPHA, meta["targets"])
    lora.remove_lora(net, "ref")
    for name in "bce":  # kohya, hypersd, and kohya again after diffusers' (alpha folded into B)
        meta_loaded = load_into_unet(net, tmp_path / f"{name}.safetensors", "check")
        got = _out(net)
        lora.remove_lora(net, "check")
        if name == "e":
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        else:
            assert torch.equal(got, want) and meta_loaded["guidance"] == 3.5
    assert read_any(start)[0].keys() == state.keys()


def test_a_qkv_with_parts_left_out_round_trips_without_them(tmp_path):
    """q and v trained, k not: the fused layer's k block is zeros, and reading it back leaves k out."""
    net = _net("sd3")
    state, meta = _random_lora(net, targets=["to_q", "to_v", "add_k_proj"])
    kohya = load_file(str(write(tmp_path / "k.safetensors", state, meta, "kohya")))
    up = kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
    assert up.shape == (48, 3 * RANK) and not up[16:32].any()  # k's rows
    back, _ = read_any(tmp_path / "k.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_a_lora_trained_on_the_fused_qkv_reads_as_diffusers_reads_it(tmp_path):
    """kohya's own FLUX trainer puts one rank-r LoRA on the fused qkv (no block structure): each of
    q, k, v gets the whole down and its rows of the up, as diffusers' reader does."""
    net = _net("flux", num_single_layers=0)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for side in ("img", "txt"):
        name = f"lora_unet_double_blocks_0_{side}_attn_qkv"
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, 32, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(96, RANK, generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "foreign.safetensors"))  # no hypersd metadata
    state, meta = read_any(tmp_path / "foreign.safetensors")
    assert meta["rank"] == RANK and meta["alpha"] == 2.0 and len(state) == 12
    base = _out(net)
    load_into_unet(net, tmp_path / "foreign.safetensors", "check")
    ours = _out(net)
    lora.remove_lora(net, "check")
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(_diffusers_out(net, tmp_path / "foreign.safetensors"), ours, atol=1e-5, rtol=0)


# -- what does not fit ------------------------------------------------------------------------------
def test_what_kohya_cannot_hold_is_refused_with_the_fix(tmp_path):
    net = _net("flux", num_single_layers=0)
    state, meta = _random_lora(net)
    with pytest.raises(HypersdError, match="could be for SD3 or for FLUX.*--backbone"):
        write(tmp_path / "k.safetensors", state, {k: v for k, v in meta.items() if k != "backbone"}, "kohya")
    path = write(tmp_path / "h.safetensors", state, meta, "hypersd")
    assert main(["lora", "convert", str(path), str(tmp_path / "k.safetensors"), "--to", "kohya",
                 "--backbone", "flux"]) == 0
    flux = _net("flux")
    state, meta = _random_lora(flux, targets=["to_q", "to_k", "to_v"])  # single blocks' linear1 lacks proj_mlp
    with pytest.raises(HypersdError, match="lacks proj_mlp.*lora_targets: transformer"):
        write(tmp_path / "s.safetensors", state, meta, "kohya")
    sd3 = _net("sd3")
    state, meta = _random_lora(sd3, targets=["to_q"])
    foreign = {k.replace("attn.to_q", "attn.to_gate"): v for k, v in state.items()}  # a layer SD3 lacks
    with pytest.raises(HypersdError, match="no SD3 original name.*--to diffusers"):
        write(tmp_path / "n.safetensors", foreign, {**meta, "backbone": "sd3"}, "kohya")


def test_a_lora_on_no_block_is_told_by_its_backbone(tmp_path, capsys):
    """The patch embedding alone: no block names it a transformer's, its ``backbone`` does."""
    net = _net("sd3")
    state, meta = _random_lora(net, targets=["pos_embed.proj"])
    kohya = load_file(str(write(tmp_path / "k.safetensors", state, meta, "kohya")))
    assert set(kohya) == {f"lora_unet_x_embedder_proj.{p}" for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    diffusers = load_file(str(write(tmp_path / "d.safetensors", state, meta, "diffusers")))
    assert all(k.startswith("transformer.pos_embed.proj.") for k in diffusers)
    want = _with_ours_removed(net)
    load_into_unet(net, tmp_path / "k.safetensors", "back")
    torch.testing.assert_close(_out(net), want, atol=1e-6, rtol=0)
    flux = _net("flux")  # and read back: a kohya file of final_layer alone is the FLUX of its metadata
    state, meta = _random_lora(flux, targets=["norm_out.linear"])
    path = write(tmp_path / "f.safetensors", state, meta, "kohya")
    assert set(load_file(str(path))) == {f"lora_unet_final_layer_adaLN_modulation_1.{p}"
                                         for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    want = _with_ours_removed(flux)
    load_into_unet(flux, path, "back")
    torch.testing.assert_close(_out(flux), want, atol=1e-6, rtol=0)
    assert main(["lora", "inspect", str(path)]) in (0, None)
    assert "1 layers of a transformer (SD3 / FLUX)" in capsys.readouterr().out
