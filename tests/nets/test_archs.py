"""The benchmark architectures are the released models' (parameter counts, built on the meta device)."""

import torch

from hypersd.nets import archs


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_unets_have_the_released_parameter_counts():
    assert _count(archs.unet("sd15", device="meta")) == 859_520_964
    assert _count(archs.unet("sdxl", device="meta")) == 2_567_463_684


def test_vae_and_text_encoders_have_the_released_parameter_counts():
    assert _count(archs.vae("sdxl", device="meta")) == 83_653_863
    clip_l, clip_g = archs.text_encoders("sdxl", device="meta")
    assert _count(clip_l) == 123_060_480
    assert _count(clip_g) == 694_659_840
    assert len(archs.text_encoders("sd15", device="meta")) == 1


def test_prompt_shapes_fit_the_unet():
    for backbone in ("sd15", "sdxl"):
        unet = archs.unet(backbone, device="meta")
        shapes = archs.prompt_shapes(backbone)
        assert shapes["hidden"][-1] == unet.config.cross_attention_dim
        if backbone == "sdxl":
            pooled = shapes["text_embeds"][0] + 6 * unet.config.addition_time_embed_dim
            assert pooled == unet.config.projection_class_embeddings_input_dim


def test_schedule_is_the_scaled_linear_one():
    acp = archs.alphas_cumprod()
    assert acp.shape == (1000,)
    assert abs(acp[0].item() - (1 - 0.00085)) < 1e-6
    assert torch.all(acp[1:] < acp[:-1])


def test_flow_transformers_and_t5_have_the_released_parameter_counts():
    assert _count(archs.transformer("sd3", device="meta")) == 2_028_328_000
    assert _count(archs.transformer("sd35-large", device="meta")) == 8_056_627_520
    assert _count(archs.transformer("flux", device="meta")) == 11_901_408_320
    *clips, t5 = archs.flow_text_encoders("flux", device="meta")
    assert _count(t5) == 4_762_310_656 and [_count(c) for c in clips] == [123_060_480]
    assert archs.flow_tokens("flux") == (4096, 512) and archs.flow_tokens("sd3") == (4096, 256 + 77)
