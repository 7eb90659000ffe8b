"""SD1.5 / SDXL teachers, against tiny pipelines saved to disk and loaded the way a user's would be."""

import json
import shutil

import pytest
import torch
from sd_tiny import LATENT_SIZE, MAX_LENGTH, tiny_pipeline

from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher

KINDS = ("sd15", "sdxl")
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk"]






@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """(kind, folder, the pipeline that was saved there, the teacher loaded from it)."""
    kind = request.param
    pipe = tiny_pipeline(kind)
    folder = tmp_path_factory.mktemp(kind) / "model"
    pipe.save_pretrained(folder)
    return kind, folder, pipe, load_teacher(kind, str(folder))


def _inputs(teacher, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *teacher.latent_shape, generator=g), torch.tensor([999, 250])


def test_schedule_shapes_and_frozen(saved):
    kind, _, pipe, t = saved
    assert t.alphas_cumprod.dtype == torch.float32 and t.T == 1000
    torch.testing.assert_close(t.alphas_cumprod, pipe.scheduler.alphas_cumprod.float())
    assert t.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert t.default_guidance == {"sd15": 7.5, "sdxl": 5.0}[kind]
    for module in (t.unet, t.vae, t.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_encode_prompt_matches_pipeline(saved):
    kind, _, pipe, t = saved
    cond = t.encode_prompt(PROMPTS)
    if kind == "sd15":
        embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        assert cond.hidden.shape == (2, MAX_LENGTH, 32) and not cond.added
        torch.testing.assert_close(cond.hidden, embeds)
        return
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert cond.hidden.shape == (2, MAX_LENGTH, 64)
    torch.testing.assert_close(cond.hidden, embeds)
    torch.testing.assert_close(cond.added["text_embeds"], pooled)
    side = 2 * LATENT_SIZE  # the tiny VAE halves
    expected = pipe._get_add_time_ids((side, side), (0, 0), (side, side), torch.float32,
                                      text_encoder_projection_dim=32)
    torch.testing.assert_close(cond.added["time_ids"], expected.repeat(2, 1))
    # the unconditional input is the pipeline's default negative: zeros
    empty = t.empty_cond(2)
    torch.testing.assert_close(empty.hidden, neg)
    torch.testing.assert_close(empty.added["text_embeds"], neg_pooled)
    assert not empty.hidden.any() and not empty.added["text_embeds"].any()


@pytest.mark.parametrize("saved", ["sdxl"], indirect=True)
def test_sdxl_time_ids_record_size_and_crop(saved):
    _, _, _, t = saved
    cond = t.encode_prompt(PROMPTS, size=(20, 24), crop=[(1, 2), (3, 4)])
    expected = torch.tensor([[20, 24, 1, 2, 16, 16], [20, 24, 3, 4, 16, 16]], dtype=torch.float32)
    torch.testing.assert_close(cond.added["time_ids"], expected)
    assert t.empty_cond(3, crop=(5, 6)).added["time_ids"].tolist() == [[16, 16, 5, 6, 16, 16]] * 3


def test_unconditional_rows_keep_each_images_size_and_crop(saved):
    kind, _, _, t = saved
    cond = t.encode_prompt(PROMPTS, size=(20, 24), crop=[(1, 2), (3, 4)]) if kind == "sdxl" \
        else t.encode_prompt(PROMPTS)
    uncond = cond.unconditional(t.empty_cond(1))
    empty = t.empty_cond(len(PROMPTS))
    assert len(uncond) == len(PROMPTS)
    torch.testing.assert_close(uncond.hidden, empty.hidden)
    if kind == "sdxl":  # the empty prompt's embeddings, the batch's own micro-conditioning
        torch.testing.assert_close(uncond.added["text_embeds"], empty.added["text_embeds"])
        torch.testing.assert_close(uncond.added["time_ids"], cond.added["time_ids"])
    else:
        assert uncond.added == {}


def test_empty_cond(saved):
    kind, _, _, t = saved
    empty = t.empty_cond(3)
    assert len(empty) == 3 and empty.hidden.shape[1:] == t.encode_prompt(["x"]).hidden.shape[1:]
    if kind == "sd15":
        torch.testing.assert_close(empty.hidden, t.encode_prompt([""]).hidden.expand(3, -1, -1))
    else:
        assert {k: v.shape for k, v in empty.added.items()} == {"text_embeds": (3, 32), "time_ids": (3, 6)}


@pytest.mark.parametrize("saved", ["sdxl"], indirect=True)
def test_sdxl_empty_cond_without_force_zeros(saved, tmp_path):
    _, folder, _, _ = saved
    copy = shutil.copytree(folder, tmp_path / "model")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    t = load_teacher("sdxl", str(copy))
    empty, encoded = t.empty_cond(2), t.encode_prompt(["", ""])
    assert empty.hidden.any()
    torch.testing.assert_close(empty.hidden, encoded.hidden)
    torch.testing.assert_close(empty.added["text_embeds"], encoded.added["text_embeds"])


def test_eps_is_the_unet(saved):
    kind, _, pipe, t = saved
    x, ts = _inputs(t)
    cond = t.encode_prompt(PROMPTS)
    eps = t.eps(x, ts, cond)
    assert eps.shape == x.shape
    kwargs = {"added_cond_kwargs": cond.added} if kind == "sdxl" else {}
    # the saved pipeline's own UNet: the loaded weights are the saved ones
    direct = pipe.unet(x, ts, encoder_hidden_states=cond.hidden, **kwargs).sample
    torch.testing.assert_close(eps, direct)


def test_eps_cfg_endpoints(saved):
    _, _, _, t = saved
    x, ts = _inputs(t)
    cond, uncond = t.encode_prompt(PROMPTS), t.empty_cond(2)
    eps_c, eps_u = t.eps(x, ts, cond), t.eps(x, ts, uncond)
    assert not torch.allclose(eps_c, eps_u)
    torch.testing.assert_close(t.eps_cfg(x, ts, cond, uncond, 1.0), eps_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t.eps_cfg(x, ts, cond, uncond, 0.0), eps_u, atol=1e-5, rtol=1e-4)


def test_encode_decode(saved):
    _, _, pipe, t = saved
    images = torch.rand(2, 3, 2 * LATENT_SIZE, 2 * LATENT_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = t.encode(images)
    assert latents.shape == (2, *t.latent_shape)
    torch.testing.assert_close(t.encode(images), latents)  # the mode, not a sample
    scale = pipe.vae.config.scaling_factor
    torch.testing.assert_close(latents, pipe.vae.encode(images).latent_dist.mode() * scale)
    decoded = t.decode(latents)
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1
    torch.testing.assert_close(decoded, pipe.vae.decode(latents / scale).sample.clamp(-1, 1))


def test_fp16_keeps_the_vae_in_float32(saved):
    kind, folder, _, _ = saved
    t = load_teacher(kind, str(folder), dtype=torch.float16)
    assert t.dtype == torch.float16 and t.text_encoder.dtype == torch.float16
    assert t.vae.dtype == torch.float32  # the VAE's config says force_upcast


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(HypersdError, match="no-such-model.*not found"):
        load_teacher("sd15", str(missing))


def test_missing_component(saved, tmp_path):
    kind, folder, _, _ = saved
    broken = shutil.copytree(folder, tmp_path / "broken", ignore=lambda d, _: ["unet"] if d == str(folder) else [])
    with pytest.raises(HypersdError, match="'unet'") as err:
        load_teacher(kind, str(broken))
    assert str(broken) in str(err.value) and "\n" not in str(err.value)


def test_wrong_backbone_for_folder(saved):
    kind, folder, _, _ = saved
    other = "sd15" if kind == "sdxl" else "sdxl"
    # an sd15 folder lacks text_encoder_2; an sdxl folder has all sd15 needs, but an SDXL UNet
    with pytest.raises(HypersdError, match="text_encoder_2" if kind == "sd15" else "use backbone sdxl"):
        load_teacher(other, str(folder))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")  # diffusers, not us
def test_hub_id_offline():
    with pytest.raises(HypersdError, match="nobody-hypersd/no-such-model") as err:
        load_teacher("sdxl", "nobody-hypersd/no-such-model")
    assert "\n" not in str(err.value)


def test_unknown_backbone(tmp_path):
    with pytest.raises(HypersdError, match="unknown backbone"):
        load_teacher("sd4", str(tmp_path))
    from hypersd.teachers.sd import load_sd

    with pytest.raises(HypersdError, match="unknown Stable Diffusion backbone"):
        load_sd("sd2", str(tmp_path))
