"""Reward models, against tiny random CLIP / BLIP models saved to disk and loaded by name."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sd_tiny import _text_config, tiny_tokenizer
from transformers import (
    AutoImageProcessor,
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
)
from transformers.image_transforms import get_resize_output_image_size

from hypersd.digits.data import NAMES, prompt_for
from hypersd.digits.judges import Judges
from hypersd.errors import HypersdError
from hypersd.rewards import REWARDS, Reward, check_scores, load_reward
from hypersd.rewards.head import MLPHead
from hypersd.rewards.imagereward import MEAN, STD
from hypersd.rewards.preprocess import ImagePreprocess

SIZE = 32  # the tiny models' input side
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse"]






def _vision(**kw):
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=SIZE, patch_size=8, **kw)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(text_config=_text_config(tokenizer).to_dict(), vision_config=_vision(), projection_dim=32)
    model = CLIPModel(config)
    with torch.no_grad():
        # A shared offset in both towers' last LayerNorm, through one projection: image and text
        # embeddings then share a direction, so CLIP scores are positive rather than floored at 0.
        model.vision_model.post_layernorm.bias.fill_(3.0)
        model.text_model.final_layer_norm.bias.fill_(3.0)
        model.visual_projection.weight.copy_(model.text_projection.weight)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), "photo", "cat"]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=40)
    BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=_vision(), image_text_hidden_size=16)
                              ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # BLIP's own processor resizes to a square (height/width), the other mode of ImagePreprocess
    BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def _head_file(path, in_features, prefix="", seed=0):
    """An MLP head saved with the public checkpoints' key names (``layers.0.weight`` ...)."""
    torch.manual_seed(seed)
    sd = {prefix + k: v for k, v in MLPHead(in_features).state_dict().items()}
    save_file(sd, str(path))
    return path, sd


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    return _head_file(tmp_path_factory.mktemp("aes") / "head.safetensors", 32)


@pytest.fixture(scope="module")
def imagereward_head(tmp_path_factory):
    # the head as it sits in ImageReward.pt, under "mlp.", next to another key that must be ignored
    path = tmp_path_factory.mktemp("ir") / "ImageReward.safetensors"
    _, sd = _head_file(path, 32, prefix="mlp.", seed=1)
    save_file({**sd, "blip.text_encoder.embeddings.word_embeddings.weight": torch.zeros(3, 2)}, str(path))
    return path, sd


@pytest.fixture(scope="module")
def rewards(clip_dir, blip_dir, aesthetic_head, imagereward_head):
    return {
        "clip": load_reward("clip", str(clip_dir)),
        "pickscore": load_reward("pickscore", str(clip_dir)),
        "hpsv2": load_reward("hpsv2", str(clip_dir)),
        "aesthetic": load_reward("aesthetic", str(clip_dir), head=str(aesthetic_head[0])),
        "imagereward": load_reward("imagereward", str(blip_dir), head=str(imagereward_head[0])),
    }


def _images(b=2, h=SIZE, w=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _quantised(images):
    """The [-1, 1] images as the uint8 PIL images a user would hand the library's processor."""
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]
    return u8.float() / 127.5 - 1, pil


# ---- the interface -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clip", "pickscore", "hpsv2", "aesthetic", "imagereward"])
def test_shape_and_gradient(rewards, name):
    reward = rewards[name]
    assert isinstance(reward, Reward)
    # not the model's size, and not square: the reward resizes and crops itself
    images = _images(h=40, w=56, seed=3).requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    if name == "clip":
        assert (scores > 0).all()  # clip floors at 0, and a floored score has no gradient
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())  # judges stay frozen


def test_rewards_stay_in_eval_mode(rewards):
    reward = rewards["aesthetic"].train()
    assert not reward.training and not reward.head.training


def test_registry(clip_dir):
    assert set(REWARDS) == {"digits", "clip", "aesthetic", "pickscore", "hpsv2", "imagereward"}
    with pytest.raises(HypersdError, match="unknown reward 'nope'"):
        load_reward("nope")
    with pytest.raises(HypersdError, match="no option heads"):
        load_reward("aesthetic", str(clip_dir), heads="x.safetensors")


def test_device_and_dtype_options(rewards, clip_dir):
    images = _images(seed=8)
    wide = load_reward("hpsv2", str(clip_dir), device="cpu", dtype=torch.float64)
    assert next(wide.parameters()).dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(wide(images, PROMPTS), rewards["hpsv2"](images, PROMPTS), atol=1e-5)


def test_inputs_are_checked(rewards):
    with pytest.raises(HypersdError, match="2 images but 1 prompts"):
        rewards["clip"](_images(), PROMPTS[:1])
    with pytest.raises(HypersdError, match=r"\[B, 3, H, W\]"):
        rewards["clip"](_images()[:, :1], PROMPTS)


# ---- digits --------------------------------------------------------------------------------

def test_digits_equals_judges():
    reward = load_reward("digits")
    labels = torch.tensor([7, 0, 3])
    images = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    scores = reward(images, [prompt_for(y) for y in labels])
    assert torch.allclose(scores, Judges().reward(images, labels))
    scores.sum().backward()
    assert images.grad.abs().sum() > 0


def test_digits_prompt_must_name_one_digit():
    reward = load_reward("digits")
    with pytest.raises(HypersdError, match="names no digit"):
        reward(torch.zeros(1, 1, 8, 8), ["a handwritten digit"])
    with pytest.raises(HypersdError, match="names several digits"):
        reward(torch.zeros(1, 1, 8, 8), ["one or two"])
    assert NAMES[7] == "seven"


# ---- preprocessing against the library's processors ---------------------------------------

@pytest.mark.parametrize("folder", ["clip_dir", "blip_dir"])
def test_preprocess_matches_processor_at_target_size(request, folder):
    proc = AutoImageProcessor.from_pretrained(request.getfixturevalue(folder))
    images, pil = _quantised(_images(b=2))
    ours = ImagePreprocess.from_processor(proc)(images)
    theirs = torch.as_tensor(np.stack(proc(pil, return_tensors="np")["pixel_values"]))
    assert ours.shape == theirs.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_preprocess_resizes_larger_image(clip_dir):
    proc = AutoImageProcessor.from_pretrained(clip_dir)
    pre = ImagePreprocess.from_processor(proc)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    for h, w in [(64, 98), (90, 48), (33, 100)]:  # 98: an odd crop margin
        expected = get_resize_output_image_size(np.zeros((3, h, w)), SIZE, default_to_square=False,
                                                input_data_format="channels_first")
        assert pre.output_size(h, w) == tuple(expected)
        # smooth, like a decoded image: PIL rounds to uint8 between its two resampling passes,
        # which on pixel noise alone moves single pixels by several levels
        smooth = F.interpolate(_images(b=1, h=8, w=8, seed=h), size=(h, w), mode="bilinear")
        images, pil = _quantised(smooth)
        ours = pre(images)
        theirs = torch.as_tensor(np.stack(proc(pil, return_tensors="np")["pixel_values"]))
        assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
        levels = (ours - theirs).abs() * std * 255  # difference in uint8 levels
        assert levels.max() < 1.5 and levels.mean() < 0.5


# ---- scores against direct computations ----------------------------------------------------

def _processed(folder, pil):
    """What the library's own image processor, saved in ``folder``, makes of the PIL images."""
    proc = AutoImageProcessor.from_pretrained(folder)
    return torch.as_tensor(np.stack(proc(pil, return_tensors="np")["pixel_values"]))


def _direct_cosine(clip_dir, images):
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = tiny_tokenizer()
    _, pil = _quantised(images)
    pixels = _processed(clip_dir, pil)
    with torch.no_grad():
        out = model(**tok(PROMPTS, padding=True, truncation=True, return_tensors="pt"), pixel_values=pixels)
    return (out.image_embeds * out.text_embeds).sum(-1), model.logit_scale.exp()


def test_clip_family_match_direct_clipmodel(rewards, clip_dir):
    images, _ = _quantised(_images(seed=5))
    cos, scale = _direct_cosine(clip_dir, images)
    with torch.no_grad():
        assert torch.allclose(rewards["clip"](images, PROMPTS), (100 * cos).clamp(min=0), atol=1e-4)
        assert torch.allclose(rewards["pickscore"](images, PROMPTS), scale * cos, atol=1e-4)
        assert torch.allclose(rewards["hpsv2"](images, PROMPTS), cos, atol=1e-6)


def test_aesthetic_loads_public_key_names(rewards, clip_dir, aesthetic_head):
    reward = rewards["aesthetic"]
    _, sd = aesthetic_head
    assert set(sd) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert all(torch.equal(reward.head.state_dict()[k], v) for k, v in sd.items())
    images, pil = _quantised(_images(seed=6))
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = _processed(clip_dir, pil)
    with torch.no_grad():
        emb = F.normalize(model(input_ids=torch.tensor([[0]]), pixel_values=pixels).image_embeds, dim=-1)
        assert torch.allclose(reward(images, PROMPTS), reward.head(emb), atol=1e-5)


def test_imagereward_matches_blip_retrieval_wiring(rewards, blip_dir, imagereward_head):
    reward = rewards["imagereward"]
    _, sd = imagereward_head
    assert all(torch.equal(reward.head.state_dict()[k[4:]], v) for k, v in sd.items() if k.startswith("mlp."))
    images, pil = _quantised(_images(seed=7))
    blip = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    tok = BertTokenizer.from_pretrained(blip_dir)
    pixels = _processed(blip_dir, pil)
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        out = blip(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels, use_itm_head=True)
        expected = (reward.head(out.question_embeds[:, 0]) - MEAN) / STD
        assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)


# ---- failures: one line that says what to pass ---------------------------------------------

def _one_line_error(match, fn, *args, **kw):
    with pytest.raises(HypersdError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_weights_are_one_line(tmp_path, clip_dir, blip_dir, aesthetic_head):
    nowhere = str(tmp_path / "nowhere")
    for name in ("clip", "pickscore", "hpsv2", "aesthetic", "imagereward"):
        _one_line_error(f"{name} reward: .*nowhere not found; pass path=", load_reward, name, nowhere)
    _one_line_error("hpsv2 reward needs its weights: pass path=", load_reward, "hpsv2")
    _one_line_error("imagereward reward needs", load_reward, "imagereward")
    _one_line_error("judge file .* not found", load_reward, "digits", nowhere + ".safetensors")
    msg = _one_line_error("aesthetic reward needs its MLP head: pass head=PATH", load_reward, "aesthetic",
                          str(clip_dir))
    assert "sac+logos+ava1-l14-linearMSE.pth" in msg and "save_file" in msg
    _one_line_error("head file .* not found", load_reward, "aesthetic", str(clip_dir), head=nowhere + ".safetensors")
    _one_line_error("imagereward reward needs its MLP head", load_reward, "imagereward", str(blip_dir))
    # a folder without a model in it
    _one_line_error("clip reward: cannot load the CLIP model from", load_reward, "clip", str(tmp_path))


def test_checkpoint_lacking_weights_is_refused(tmp_path, clip_dir):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "partial"
    shutil.copytree(clip_dir, folder)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["visual_projection.weight"]  # transformers would fill it with random numbers
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _one_line_error(r"lacks weights \(visual_projection.weight\)", load_reward, "clip", str(folder))


def test_unreachable_hub_id_is_one_line():
    _one_line_error("not a local folder, and the CLIP model is neither in the hub cache nor downloadable", load_reward,
                    "clip", "nobody-hypersd/no-such-clip")


def test_head_files_are_safetensors_with_the_right_keys(tmp_path, clip_dir):
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    pth.write_bytes(b"not read")
    msg = _one_line_error("not a .safetensors file", load_reward, "aesthetic", str(clip_dir), head=str(pth))
    assert "weights_only=True" in msg
    bad = tmp_path / "bad.safetensors"
    save_file({"layers.0.weight": torch.zeros(1024, 32)}, str(bad))
    _one_line_error("is not a aesthetic head for 32-d features .missing layers.0.bias", load_reward,
                    "aesthetic", str(clip_dir), head=str(bad))
    wide, _ = _head_file(tmp_path / "wide.safetensors", 768)  # the real ViT-L head on the tiny CLIP
    _one_line_error(r"layers.0.weight is \[1024, 768\], expected \[1024, 32\]", load_reward,
                    "aesthetic", str(clip_dir), head=str(wide))


# ---- the output checker --------------------------------------------------------------------

def test_check_scores():
    good = torch.tensor([1.0, 2.0])
    assert check_scores(good, 2, "x") is good
    _one_line_error("pickscore reward returned 1 non-finite", check_scores, torch.tensor([1.0, float("nan")]), 2,
                    "pickscore")
    _one_line_error(r"aesthetic reward returned shape \(2, 1\); expected \(2,\)", check_scores, good[:, None], 2,
                    "aesthetic")
    _one_line_error("clip reward returned list", check_scores, [1.0, 2.0], 2, "clip")


def test_a_broken_reward_is_caught_by_name():
    class Broken(Reward):
        name = "broken"

        def score(self, images, prompts):
            return images.mean((1, 2, 3)) * float("nan")

    _one_line_error("broken reward returned 2 non-finite", Broken(), _images(), PROMPTS)
