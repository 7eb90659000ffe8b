"""Aspect-ratio buckets: non-square images cached at their nearest bucket, sizes and crops recorded,
training batches drawn one bucket at a time."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from cache_kill import killed_after_flushes
from PIL import Image
from safetensors import safe_open
from sd_tiny import save_tiny

from hypersd.data.buckets import BucketBatches, make_buckets, nearest_bucket
from hypersd.data.cache import CachedData, build_cache, read_manifest
from hypersd.data.images import resize_and_crop
from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher

# (width, height) of each image: three wide, two tall, one square; with the files' names
SIZES = {"w0": (60, 24), "w1": (40, 24), "w2": (30, 20), "t0": (20, 50), "t1": (24, 40), "s0": (18, 18)}
WIDE, SQUARE, TALL = (12, 20), (16, 16), (20, 12)  # the (height, width) buckets of 16² at a 4-pixel step


def write_shapes(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for key, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{key}.png")
        (folder / f"{key}.txt").write_text(f"a picture named {key}")
    (folder / "zbroken.png").write_bytes(b"not a png")  # still skipped and counted
    (folder / "zbroken.txt").write_text("broken")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    models = {kind: str(save_tiny(kind, root / kind)) for kind in ("sd15", "sdxl")}
    return root, write_shapes(root / "images"), models, {k: load_teacher(k, m) for k, m in models.items()}


def _bucketed(kind, world, out, **kw):
    _, images, models, teachers = world
    return build_cache(kind, models[kind], str(images), out, teacher=teachers[kind], progress=False, buckets=True,
                       bucket_step=4, **{"batch": 4, "shard_size": 4, **kw})


def _rows(folder):
    """Every shard's tensors and per-row metadata."""
    out = []
    for entry in read_manifest(folder, complete=False)["shards"]:
        with safe_open(str(folder / entry["file"]), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open is not iterable)
            out.append((tensors, json.loads(f.metadata()["hypersd"])))
    return out


def test_buckets_of_about_the_area_on_the_step():
    assert make_buckets(16, 4) == [TALL, SQUARE, WIDE]
    sdxl = make_buckets(1024)
    assert (1024, 1024) in sdxl and (832, 1216) in sdxl and (1216, 832) in sdxl  # SDXL's own 832x1216
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h, w) / min(h, w) <= 2 for h, w in sdxl)
    assert min(h * w for h, w in sdxl) > 0.95 * 1024**2  # each about the square's area
    assert make_buckets(512, max_ratio=1.0) == [(512, 512)]
    assert nearest_bucket(sdxl, 1920, 1080) == sdxl.index((768, 1344))  # 16:9 to 7:4
    assert nearest_bucket(sdxl, 1080, 1920) == sdxl.index((1344, 768))
    for side, bad, match in ((1024, {"step": 48, "multiple": 32}, "multiple of 32"),
                             (1000, {}, "multiple of --bucket-step 64"), (1024, {"max_ratio": 0.5}, "at least 1")):
        with pytest.raises(HypersdError, match=match):
            make_buckets(side, **bad)


def test_resize_and_crop_covers_a_bucket_and_records_the_crop():
    image = Image.new("RGB", (60, 24))
    p = resize_and_crop(image, WIDE)
    assert p.pixels.shape == (3, 12, 20) and p.original_size == (24, 60) and p.crop_top_left == (0, 5)
    p = resize_and_crop(Image.new("RGB", (20, 50)), TALL)
    assert p.pixels.shape == (3, 20, 12) and p.original_size == (50, 20) and p.crop_top_left == (5, 0)
    assert resize_and_crop(image, 16).pixels.shape == (3, 16, 16)  # the square, as before


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cache_puts_each_image_in_its_bucket_and_records_sizes(kind, world, tmp_path):
    teacher = world[3][kind]
    m = _bucketed(kind, world, tmp_path / "c")
    assert m["complete"] and m["written"] == 6 and m["skipped"] == {"broken_image": 1}
    held = {(b["height"], b["width"]): b["items"] for b in m["buckets"]}
    assert held == {WIDE: 3, SQUARE: 1, TALL: 2}
    assert m["bucketing"] == {"step": 4, "max_ratio": 2.0}
    seen, crops = {}, {}
    for tensors, meta in _rows(tmp_path / "c"):
        counts = Counter(map(tuple, meta["target_size"]))
        for hw, n in counts.items():  # one latents tensor per bucket, of that bucket's shape
            assert tensors[f"latents-{hw[0]}x{hw[1]}"].shape == (n, 4, hw[0] // 2, hw[1] // 2)
        assert "latents" not in tensors
        at = Counter()
        for i, key in enumerate(meta["keys"]):
            hw = tuple(meta["target_size"][i])
            w, h = SIZES[key]
            seen[key], crops[key] = hw, meta["crop_top_left"][i]
            assert meta["original_size"][i] == [h, w]
            p = resize_and_crop(Image.open(world[1] / f"{key}.png").convert("RGB"), hw)
            assert meta["crop_top_left"][i] == list(p.crop_top_left)
            z = tensors[f"latents-{hw[0]}x{hw[1]}"][at[hw]]
            at[hw] += 1
            torch.testing.assert_close(z.float(), teacher.encode(p.pixels[None])[0], atol=2e-3, rtol=1e-2)
            if kind == "sdxl":  # time ids: the original size, the crop, and the bucket as the target size
                assert tensors["time_ids"][i].tolist() == [h, w, *p.crop_top_left, *hw]
    assert seen == {"w0": WIDE, "w1": WIDE, "w2": WIDE, "t0": TALL, "t1": TALL, "s0": SQUARE}
    assert crops["w0"] == [0, 5] and crops["t0"] == [5, 0]  # centred along the side left over
    _assert_bytes_as_stored(m, tmp_path / "c")


def _assert_bytes_as_stored(m, folder):
    """Each bucket's bytes_per_item is what a row of it takes in the shards; the cache's, their mean."""
    total, prompt = 0, None
    for tensors, meta in _rows(folder):
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        prompt = sum(v[0].numel() * v.element_size() for k, v in tensors.items() if not k.startswith("latents"))
        for b in m["buckets"]:
            z = tensors.get(f"latents-{b['height']}x{b['width']}")
            if z is not None:
                assert b["bytes_per_item"] == z[0].numel() * z.element_size() + prompt
    assert m["bytes_per_item"] == round(total / m["written"])
    sizes = {(b["height"], b["width"]): b["bytes_per_item"] for b in m["buckets"]}
    assert sizes[WIDE] == sizes[TALL] < sizes[SQUARE]  # 12x20 latents hold fewer bytes than 16x16
    assert m["bytes_per_item"] < sizes[SQUARE]  # the square's figure was only an upper bound


def test_batches_never_mix_buckets_and_reach_every_item(world, tmp_path):
    teacher = world[3]["sdxl"]
    _bucketed("sdxl", world, tmp_path / "c")
    cached = CachedData(tmp_path / "c", "sdxl").attach(teacher)
    assert cached.bucket_counts() == {"20x12": 3, "16x16": 1, "12x20": 2}
    by_caption = {c: cached.bucket_of[i] for i, c in enumerate(cached.captions)}
    g = torch.Generator().manual_seed(0)
    shapes, reached = Counter(), Counter()
    for _ in range(60):
        z, prompts, cond = cached.batch_cond(3, g)
        assert len({by_caption[p] for p in prompts}) == 1  # one bucket a batch
        h, w = cached.sizes[by_caption[prompts[0]]]
        assert z.shape == (3, 4, h // 2, w // 2)
        assert cond.added["time_ids"][:, 4:].tolist() == [[h, w]] * 3  # the bucket, as each row's target size
        shapes[z.shape[2:]] += 1
        reached.update(prompts)
    assert len(shapes) == 3 and len(reached) == 6  # every bucket, every item
    # a bucket of fewer items than the batch goes round its items: each of them, none from elsewhere
    for seed in range(40):
        _, prompts = cached.batch(5, torch.Generator().manual_seed(seed))
        members = {c for c, b in by_caption.items() if b == by_caption[prompts[0]]}
        assert set(prompts) == members
    a = cached.batch_cond(4, torch.Generator().manual_seed(7))
    b = cached.batch_cond(4, torch.Generator().manual_seed(7))
    assert a[1] == b[1] and torch.equal(a[0], b[0])  # the generator alone decides: a resume draws the same


def test_bucket_batches_draw_items_as_often_as_a_uniform_draw():
    groups = [[0, 1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    sampler, g, counts = BucketBatches(groups), torch.Generator().manual_seed(0), Counter()
    for _ in range(3000):
        batch = sampler.draw(4, g)
        assert len(batch) == 4 and len({next(b for b, grp in enumerate(groups) if i in grp) for i in batch}) == 1
        if len(set(batch)) < 4:  # repeats only where a bucket holds fewer items than the batch
            assert set(batch) <= {8, 9, 10, 11}
        counts.update(batch)
    expected = 3000 * 4 / 12
    assert all(abs(counts[i] - expected) < 0.1 * expected for i in range(12))
    with pytest.raises(HypersdError, match="no bucket"):
        BucketBatches([[], []])


def test_a_killed_bucketed_cache_resumes_to_the_same_shards(world, tmp_path, monkeypatch):
    full = _bucketed("sd15", world, tmp_path / "full", shard_size=2, batch=2, crop="random")
    with killed_after_flushes(monkeypatch):
        _bucketed("sd15", world, tmp_path / "part", shard_size=2, batch=2, crop="random")
    with pytest.raises(HypersdError, match=r"other settings \(bucketing\)"):
        build_cache("sd15", world[2]["sd15"], str(world[1]), tmp_path / "part", teacher=world[3]["sd15"],
                    progress=False, shard_size=2, batch=2, crop="random")
    again = _bucketed("sd15", world, tmp_path / "part", shard_size=2, batch=2, crop="random")
    assert again["buckets"] == full["buckets"] and again["written"] == 6
    assert again["bytes_per_item"] == full["bytes_per_item"]  # the mean over every shard's items, not the last's
    for (a, ma), (b, mb) in zip(_rows(tmp_path / "full"), _rows(tmp_path / "part")):
        assert ma == mb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_partial_bucketed_cache_from_before_bucket_sizes_continues(world, tmp_path, monkeypatch):
    with killed_after_flushes(monkeypatch, n=1):
        _bucketed("sd15", world, tmp_path / "c", shard_size=2, batch=2)
    m = read_manifest(tmp_path / "c", complete=False)
    square = m["bytes_per_item"]
    for b in m["buckets"]:  # as the manifest was written before each bucket stated its own figure
        del b["bytes_per_item"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    done = _bucketed("sd15", world, tmp_path / "c", shard_size=2, batch=2)
    assert done["complete"] and done["written"] == 6
    assert done["bytes_per_item"] == square  # the square's upper bound, as that manifest stated it
    assert len(CachedData(tmp_path / "c", "sd15").attach(world[3]["sd15"])) == 6


def test_square_caches_old_and_new_still_read(world, tmp_path):
    _, images, models, teachers = world
    build_cache("sd15", models["sd15"], str(images), tmp_path / "sq", teacher=teachers["sd15"], progress=False)
    m = read_manifest(tmp_path / "sq")
    assert "buckets" not in m and m["bucketing"] is None
    with safe_open(str(tmp_path / "sq" / m["shards"][0]["file"]), "pt") as f:
        row = {k: f.get_tensor(k)[0] for k in f.keys()}  # noqa: SIM118 (a safe_open is not iterable)
    assert m["bytes_per_item"] == sum(v.numel() * v.element_size() for v in row.values())  # every item: the square
    del m["bucketing"]  # as a cache written before buckets were
    (tmp_path / "sq" / "manifest.json").write_text(json.dumps(m))
    cached = CachedData(tmp_path / "sq", "sd15").attach(teachers["sd15"])
    assert cached.sampler is None and len(cached) == 6
    z, _ = cached.batch(4, torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 8, 8)
    with pytest.raises(HypersdError, match="pass --buckets too"):
        build_cache("sd15", models["sd15"], str(images), tmp_path / "x", teacher=teachers["sd15"], bucket_step=4)


def test_cache_command_with_buckets_and_a_damaged_shard(world, tmp_path, capsys):
    from hypersd.cli import main

    _, images, models, teachers = world
    out = tmp_path / "c"
    argv = ["cache", "--backbone", "sd15", "--model", models["sd15"], "--data", str(images), "--out", str(out),
            "--resolution", "16", "--buckets", "--bucket-step", "4", "--shard-size", "4", "--quiet"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "wrote 6 items at 16px in 2 shards" in said and "buckets (width x height, items): 12x20 2, 16x16 1, 20x12 3" in said
    assert "MiB an item (the mean over the buckets)" in said
    square = [a for a in argv if a != "--buckets"]
    assert main([*square[:8], str(tmp_path / "x"), *square[9:]]) == 2  # bucket options without --buckets
    assert "pass --buckets too" in capsys.readouterr().err
    m = read_manifest(out)
    second = out / m["shards"][1]["file"]
    second.write_bytes(second.read_bytes()[:100])  # damaged: its rows are skipped and counted, the rest read
    cached = CachedData(out, "sd15").attach(teachers["sd15"])
    assert cached.skipped == {"unreadable_shard": 2} and len(cached) == 4
    assert sum(cached.bucket_counts().values()) == 4
