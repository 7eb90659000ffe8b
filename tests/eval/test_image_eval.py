"""hypersd eval on real images: rewards by name, FID through torchmetrics, JSON and Markdown out."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd_tiny import _text_config, save_tiny, tiny_tokenizer
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from hypersd.cli import main
from hypersd.errors import HypersdError
from hypersd.eval import images as image_eval
from hypersd.eval.frechet import frechet_distance
from hypersd.eval.images import (
    evaluate,
    image_prompts,
    list_images,
    reward_settings,
    write_report,
)
from hypersd.inference.jobs import save_png
from hypersd.rewards import load_reward

SIZE = 16  # the tiny pipeline's images


class TinyFeatures(nn.Module):
    """A stand-in for Inception: per-channel mean and spread of uint8 images, so FID has
    something distribution-shaped to compare; records the sizes it is shown."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        assert x.dtype == torch.uint8  # what the default Inception takes too
        self.seen.append(tuple(x.shape[-2:]))
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP saved as a transformers folder, with its tokenizer and processor."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=_text_config(tokenizer).to_dict(), vision_config=vision, projection_dim=32))
    with torch.no_grad():  # image and text embeddings share a direction: scores above CLIP score's floor of 0
        model.vision_model.post_layernorm.bias.fill_(3.0)
        model.text_model.final_layer_norm.bias.fill_(3.0)
        model.visual_projection.weight.copy_(model.text_projection.weight)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _images(n, seed, low=0, high=256, size=(SIZE, SIZE)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, *size), generator=g, dtype=torch.int64).to(torch.uint8)


def _write(folder, images, prompts=None, ext="png"):
    """PNGs with their prompt in the metadata (as hypersd generate writes them), or plain images."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        path = folder / f"{i:05d}.{ext}"
        if prompts:
            save_png(x.float() / 127.5 - 1, path, prompts[i], {"seed": i})
        else:
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)
    return folder


PROMPTS = ["a cat", "a dog", "a red house", "a lighthouse", "a bowl of fruit", "a mountain lake"]


@pytest.fixture
def folders(tmp_path):
    fake = _images(6, 0, 0, 200)
    real = _images(5, 1, 60, 256)
    return {"images": _write(tmp_path / "images", fake, PROMPTS), "reference": _write(tmp_path / "ref", real),
            "fake": fake, "real": real}


def test_scores_and_fid_equal_direct_computation(folders, clip_dir):
    clip = load_reward("clip", str(clip_dir))
    files, ref = list_images(folders["images"]), list_images(folders["reference"])
    prompts = image_prompts(files)
    assert prompts == PROMPTS  # read back from each PNG's metadata
    feature = TinyFeatures()
    metric = image_eval.make_fid(feature)
    result = evaluate(files, prompts, {"clip": clip}, ref, fid_feature=feature, batch_size=4, fid=metric)

    with torch.no_grad():
        direct = clip(folders["fake"].float() / 127.5 - 1, PROMPTS)
    assert [r["clip"] for r in result.images] == pytest.approx(direct.tolist(), abs=1e-4)
    assert result.metrics["clip"]["mean"] == pytest.approx(direct.mean().item(), abs=1e-4)
    assert result.metrics["clip"]["mean"] > 0 and result.metrics["clip"]["n"] == 6

    # the FID of torchmetrics' running sums equals the Fréchet distance of the same features, all at once
    with torch.no_grad():
        want = frechet_distance(TinyFeatures()(folders["fake"]).numpy(), TinyFeatures()(folders["real"]).numpy())
    fid = result.metrics["fid"]
    assert fid["value"] == pytest.approx(want, rel=1e-4) and want > 1e-3
    assert fid["value"] == pytest.approx(float(metric.compute()), rel=1e-4)  # torchmetrics' own formula agrees
    assert (fid["n"], fid["n_reference"]) == (6, 5)
    assert feature.seen == [(SIZE, SIZE)] * 4  # two batches of each side


def test_fid_is_zero_against_the_same_images(folders):
    files = list_images(folders["images"])
    same = evaluate(files, None, {}, files, fid_feature=TinyFeatures()).metrics["fid"]["value"]
    other = evaluate(files, None, {}, list_images(folders["reference"]), fid_feature=TinyFeatures()).metrics["fid"]["value"]
    assert abs(same) < 1e-4 and other > 100 * abs(same) + 1e-3


def test_reference_brought_to_the_model_resolution(folders, tmp_path):
    # wider and larger real images (COCO's are 640x480): resized and centre-cropped to 16x16
    ref = _write(tmp_path / "big", _images(3, 2, size=(24, 40)), ext="jpg")
    feature = TinyFeatures()
    evaluate(list_images(folders["images"]), None, {}, list_images(ref), fid_feature=feature)
    assert set(feature.seen) == {(SIZE, SIZE)}


def test_report_json_and_markdown(folders, clip_dir, tmp_path):
    clip = load_reward("clip", str(clip_dir))
    files = list_images(folders["images"])
    result = evaluate(files, image_prompts(files), {"clip": clip}, list_images(folders["reference"]),
                      fid_feature=TinyFeatures(), settings={"images": str(folders["images"])})
    js, md = write_report(result, tmp_path / "out")
    data = json.loads(js.read_text())
    assert set(data["metrics"]) == {"clip", "fid"} and len(data["images"]) == 6
    assert data["images"][2] == {"file": "00002.png", "prompt": "a red house", "clip": pytest.approx(
        result.images[2]["clip"])}
    text = md.read_text()
    assert "| clip |" in text and "FID (vs 5 reference images)" in text
    assert f"{result.metrics['fid']['value']:.3f}" in text
    with pytest.raises(HypersdError, match="already exists"):
        write_report(result, tmp_path / "out")


def test_prompts_must_match_the_images(folders, tmp_path):
    files = list_images(folders["images"])
    lines = tmp_path / "p.txt"
    lines.write_text("\n".join(f"prompt {i}" for i in range(6)))
    assert image_prompts(files, lines) == [f"prompt {i}" for i in range(6)]
    lines.write_text("one\ntwo\n")
    with pytest.raises(HypersdError, match="2 prompts for 6 images"):
        image_prompts(files, lines)
    with pytest.raises(HypersdError, match="no prompt in its metadata; pass --prompts"):
        image_prompts(list_images(folders["reference"]))
    with pytest.raises(HypersdError, match="holds no image"):
        list_images(tmp_path)


def test_reward_settings():
    s = reward_settings(["clip", "aesthetic"], ["aesthetic=/m/clip"], ["aesthetic.head=h.safetensors",
                                                                        "clip.processor=/p"])
    assert s == {"clip": {"processor": "/p"}, "aesthetic": {"path": "/m/clip", "head": "h.safetensors"}}
    with pytest.raises(HypersdError, match="unknown image reward 'digits'"):
        reward_settings(["digits"], [], [])
    with pytest.raises(HypersdError, match="not in --rewards"):
        reward_settings(["clip"], ["pickscore=/x"], [])
    with pytest.raises(HypersdError, match="NAME.KEY=VALUE"):
        reward_settings(["clip"], [], ["head=/x"])


@pytest.fixture
def tiny_fid(monkeypatch):
    """The command's FID with the tiny extractor in place of Inception (whose weights need a download)."""
    real = image_eval.make_fid
    monkeypatch.setattr(image_eval, "make_fid", lambda feature=2048: real(TinyFeatures()))


def test_cli_images(folders, clip_dir, tmp_path, tiny_fid, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--images", str(folders["images"]), "--reference", str(folders["reference"]),
            "--reward-path", f"clip={clip_dir}", "--out-dir", str(out), "--device", "cpu"]
    assert main(args) == 0
    data = json.loads((out / "image_eval.json").read_text())
    assert data["metrics"]["clip"]["n"] == 6 and data["metrics"]["fid"]["value"] > 0
    assert data["settings"]["rewards"] == {"clip": {"path": str(clip_dir)}}
    assert "| clip |" in capsys.readouterr().out
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_cli_model_generates_then_scores(tmp_path, clip_dir, capsys):
    model = save_tiny("sd15", tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red house\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--prompts", str(prompts), "--steps", "2", "--guidance", "2",
                 "--reward-path", f"clip={clip_dir}", "--out-dir", str(out), "--device", "cpu"]) == 0
    data = json.loads((out / "image_eval.json").read_text())
    assert [r["prompt"] for r in data["images"]] == ["a cat", "a dog", "a red house"]
    assert data["settings"]["generated"]["timesteps"] == [999, 499]
    assert data["settings"]["generated"]["guidance"] == 2.0
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert main(["eval", "--model", str(model), "--prompts", str(prompts), "--steps", "2,4", "--out-dir",
                 str(tmp_path / "e2"), "--device", "cpu"]) == 2
    assert "one --steps value" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_model_on_sd3_and_flux_scores_generates_images(tmp_path, clip_dir, kind):
    """eval --model through StableDiffusion3Pipeline / FluxPipeline: the images it scores are
    ``hypersd generate``'s of the same seeds, at the size asked for, and the report says how they were made."""
    from flow_tiny import LATENT_SIZE, save_flow_tiny

    side = 2 * LATENT_SIZE
    model = save_flow_tiny(kind, tmp_path / kind)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    sampling = ["--model", str(model), "--steps", "2", "--guidance", "2", "--width", str(side), "--height",
                str(side), "--seed", "3", "--device", "cpu"]
    out = tmp_path / "eval"
    assert main(["eval", *sampling, "--prompts", str(prompts), "--reward-path", f"clip={clip_dir}",
                 "--out-dir", str(out)]) == 0
    data = json.loads((out / "image_eval.json").read_text())
    made = data["settings"]["generated"]
    assert (made["backbone"], made["steps"], made["guidance"], made["width"]) == (kind, 2, 2.0, side)
    assert data["metrics"]["clip"]["n"] == 2
    assert main(["generate", *sampling, "--prompts", str(prompts), "--out", str(tmp_path / "gen"), "--quiet"]) in (0, None)
    for name in ("00000.png", "00001.png"):
        scored, generated = (np.asarray(Image.open(d / name)) for d in (out / "images", tmp_path / "gen"))
        assert scored.shape == (side, side, 3) and np.array_equal(scored, generated)


@pytest.mark.parametrize("argv, message", [
    (["--rewards", "aesthetic", "--reward-path", "aesthetic={clip}"], "--reward-option aesthetic.head=PATH"),
    (["--rewards", "hpsv2"], "--reward-path hpsv2=PATH"),
    (["--rewards", "clip,nope"], "unknown image reward 'nope'"),
])
def test_missing_reward_weights_fail_in_one_line(folders, clip_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("{clip}", str(clip_dir)) for a in argv]
    assert main(["eval", "--images", str(folders["images"]), "--out-dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "image_eval.json").exists()


def test_real_image_flags_need_images_or_model(tmp_path, capsys):
    assert main(["eval", "--reference", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    assert "--reference is for real images: add --images DIR or --model M" in capsys.readouterr().err
    assert main(["eval", "--images", str(tmp_path), "--model", "m", "--out-dir", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err


def test_missing_inception_is_one_line(monkeypatch):
    """Without torch-fidelity, the default Inception FID says what to install."""
    from torchmetrics.image import fid

    monkeypatch.setattr(fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(HypersdError, match="needs torch-fidelity"):
        image_eval.make_fid(2048)
    with pytest.raises(HypersdError, match="not an Inception-v3 layer"):
        image_eval.make_fid(100)
    assert np.isfinite(float(image_eval.make_fid(TinyFeatures()).to("cpu").real_features_sum.sum()))


def test_missing_inception_stops_before_generating(folders, tmp_path, monkeypatch, capsys):
    from torchmetrics.image import fid

    monkeypatch.setattr(fid, "_TORCH_FIDELITY_AVAILABLE", False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tmp_path / "no-model-needed"), "--prompts", str(prompts), "--rewards", "none",
                 "--reference", str(folders["reference"]), "--out-dir", str(out)]) == 2
    assert "pip install 'hypersd[fid]'" in capsys.readouterr().err
    assert not list(out.rglob("*.png"))  # nothing was generated
