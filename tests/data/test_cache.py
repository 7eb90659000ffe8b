"""The latent cache: written from tiny SD1.5 / SDXL teachers, resumed, checked and read."""

import json

import pytest
import torch
from cache_kill import killed_after_flushes
from safetensors import safe_open
from safetensors.torch import save_file
from sd_tiny import LATENT_SIZE, save_tiny
from test_imagedata import BAD_REASONS, write_folder, write_shards

from hypersd.cli import main
from hypersd.data.cache import CachedData, build_cache, read_manifest
from hypersd.data.images import FolderSource, crop_rng, resize_and_crop
from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: str(save_tiny(kind, root / kind)) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def teachers(models):
    return {kind: load_teacher(kind, path) for kind, path in models.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "images"
    return folder, write_folder(folder, n_good=7)


def _cache(kind, models, teachers, data, out, **kw):
    return build_cache(kind, models[kind], str(data[0]), out, teacher=teachers[kind], progress=False,
                       **{"batch": 3, "shard_size": 4, **kw})


def _shards(folder):
    """Every tensor and caption of a cache, shard by shard."""
    out = []
    for entry in read_manifest(folder, complete=False)["shards"]:
        with safe_open(str(folder / entry["file"]), "pt") as f:
            out.append(({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["hypersd"])["captions"]))
    return out


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cache_holds_the_teachers_encodings_and_counts_the_skips(kind, models, teachers, data, tmp_path):
    t = teachers[kind]
    m = _cache(kind, models, teachers, data, tmp_path / "c")
    assert m["complete"] and m["written"] == 7 and m["skipped"] == BAD_REASONS
    assert [s["rows"] for s in m["shards"]] == [4, 3]
    assert m["resolution"] == 16 and m["latent_shape"] == [4, LATENT_SIZE, LATENT_SIZE]
    items = list(FolderSource(data[0]))
    (first, captions), _ = _shards(tmp_path / "c")
    assert captions == [it.caption for it in items[:4]]
    prepared = [resize_and_crop(it.image, 16, "center", crop_rng(0, it.key)) for it in items[:4]]
    want_z = t.encode(torch.stack([p.pixels for p in prepared]))
    torch.testing.assert_close(first["latents"].float(), want_z, atol=2e-3, rtol=1e-2)  # stored as float16
    if kind == "sdxl":  # each row's own original size and crop in its time ids
        cond = t.encode_prompt(captions, size=[p.original_size for p in prepared],
                               crop=[p.crop_top_left for p in prepared])
        assert first["time_ids"].dtype == torch.float32
        assert first["time_ids"][:, :4].tolist() == [[*p.original_size, *p.crop_top_left] for p in prepared]
        assert len({tuple(r) for r in first["time_ids"][:, :4].tolist()}) > 1
        torch.testing.assert_close(first["text_embeds"].float(), cond.added["text_embeds"], atol=2e-3, rtol=1e-2)
    else:
        cond = t.encode_prompt(captions)
        assert set(first) == {"latents", "hidden"}
    torch.testing.assert_close(first["hidden"].float(), cond.hidden, atol=2e-3, rtol=1e-2)


def test_reader_batches_match_the_cache_and_the_teacher(models, teachers, data, tmp_path):
    t = teachers["sdxl"]
    _cache("sdxl", models, teachers, data, tmp_path / "c", dtype="float32")
    cached = CachedData(tmp_path / "c", "sdxl").attach(t)
    assert len(cached) == 7 and not cached.skipped
    z, prompts, cond = cached.batch_cond(5, torch.Generator().manual_seed(3))
    z2, prompts2 = cached.batch(5, torch.Generator().manual_seed(3))
    assert prompts == prompts2 and torch.equal(z, z2)  # the same draw
    assert z.shape == (5, *t.latent_shape) and cond.hidden.dtype == t.dtype
    want = t.encode_prompt(prompts)
    torch.testing.assert_close(cond.hidden, want.hidden)
    torch.testing.assert_close(cond.added["text_embeds"], want.added["text_embeds"])
    assert cond.added["time_ids"].shape == (5, 6)


def test_cache_command_on_tar_shards_reports_counts(models, tmp_path, capsys):
    write_shards(tmp_path / "w")
    out = tmp_path / "c"
    argv = ["cache", "--backbone", "sd15", "--model", models["sd15"], "--data", str(tmp_path / "w"),
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "wrote 4 items at 16px in 1 shards" in said and "skipped 6" in said and "broken_shard 1" in said
    assert main(argv) == 2  # never overwritten without --force
    assert "already holds a complete cache" in capsys.readouterr().err
    assert main([*argv, "--force", "--shard-size", "2"]) == 0
    assert [s["rows"] for s in read_manifest(out)["shards"]] == [2, 2]


def test_a_killed_cache_resumes_to_the_same_shards(models, teachers, data, tmp_path, monkeypatch):
    _cache("sd15", models, teachers, data, tmp_path / "full", shard_size=2, crop="random")
    with killed_after_flushes(monkeypatch):
        _cache("sd15", models, teachers, data, tmp_path / "part", shard_size=2, crop="random")
    part = read_manifest(tmp_path / "part", complete=False)
    assert not part["complete"] and len(part["shards"]) == 2
    save_file({"latents": torch.zeros(1)}, str(tmp_path / "part" / "shard-00002.safetensors"))  # a stray file
    (tmp_path / "part" / ".shard-00002.safetensors.tmp-99999").write_bytes(b"half")  # a SIGKILL mid-write
    with pytest.raises(HypersdError, match="unfinished"):
        CachedData(tmp_path / "part")
    with pytest.raises(HypersdError, match=r"other settings \(crop\)"):
        _cache("sd15", models, teachers, data, tmp_path / "part", shard_size=2)
    m = _cache("sd15", models, teachers, data, tmp_path / "part", shard_size=2, crop="random")
    assert m["complete"] and m["written"] == 7 and m["skipped"] == BAD_REASONS
    assert not list((tmp_path / "part").glob(".*"))  # the killed run's temporary file is gone
    full, again = _shards(tmp_path / "full"), _shards(tmp_path / "part")
    assert [c for _, c in full] == [c for _, c in again]
    for (a, _), (b, _) in zip(full, again):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_caches_are_refused(models, teachers, data, tmp_path):
    _cache("sdxl", models, teachers, data, tmp_path / "xl")
    with pytest.raises(HypersdError, match="made for backbone sdxl, not sd15"):
        CachedData(tmp_path / "xl", "sd15")
    _cache("sd15", models, teachers, data, tmp_path / "big", resolution=32)
    with pytest.raises(HypersdError, match=r"latents \[4, 16, 16\] \(resolution 32\).*denoises \[4, 8, 8\]"):
        CachedData(tmp_path / "big", "sd15").attach(teachers["sd15"])
    _cache("sd15", models, teachers, data, tmp_path / "c")
    other = load_teacher("sd15", str(save_tiny("sd15", tmp_path / "other", seed=1)))
    with pytest.raises(HypersdError, match="another text encoder"):
        CachedData(tmp_path / "c", "sd15").attach(other)
    with pytest.raises(HypersdError, match="has no manifest.json"):
        CachedData(tmp_path)


def test_wrong_sized_and_damaged_shards_are_skipped_and_counted(models, teachers, data, tmp_path):
    out = tmp_path / "c"
    _cache("sd15", models, teachers, data, out, shard_size=3)  # shards of 3, 3, 1
    m = read_manifest(out)
    shard = out / m["shards"][0]["file"]
    with safe_open(str(shard), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**tensors, "latents": torch.zeros(3, 4, 4, 4)}, str(shard), metadata=meta)  # wrong size
    (out / m["shards"][1]["file"]).write_bytes(b"damaged")
    cached = CachedData(out, "sd15").attach(teachers["sd15"])
    assert len(cached) == 1 and dict(cached.skipped) == {"wrong_size": 3, "unreadable_shard": 3}
    z, prompts = cached.batch(4, torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 8, 8) and len(set(prompts)) == 1  # only the last shard's one item
    (out / m["shards"][2]["file"]).unlink()
    with pytest.raises(HypersdError, match=r"no usable items .*unreadable_shard 4, wrong_size 3"):
        CachedData(out, "sd15")


def test_cache_refusals_are_one_line(models, teachers, data, tmp_path):
    with pytest.raises(HypersdError, match="serves the sd15, sdxl, sd3, flux backbones"):
        build_cache("digits", "m", str(data[0]), tmp_path / "c")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(HypersdError, match="not empty and holds no hypersd cache"):
        _cache("sd15", models, teachers, data, tmp_path / "busy")
    _cache("sd15", models, teachers, data, tmp_path / "busy", force=True)  # beside the user's file, kept
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(HypersdError, match="multiple of the VAE's factor 2"):
        _cache("sd15", models, teachers, data, tmp_path / "odd", resolution=15)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nothing")
    (tmp_path / "bad" / "x.txt").write_text("a caption")
    with pytest.raises(HypersdError, match=r"no usable items .*broken_image 1"):
        _cache("sd15", models, teachers, (tmp_path / "bad", None), tmp_path / "none")
