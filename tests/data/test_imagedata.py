"""Image–caption sources: folders, webdataset tar shards, datasets folders, with bad items in them."""

import io
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from hypersd.data.images import (
    DatasetsSource,
    FolderSource,
    TarSource,
    crop_rng,
    open_source,
    resize_and_crop,
    split_key,
)
from hypersd.errors import HypersdError

BAD_REASONS = {"broken_image": 1, "missing_caption": 1, "empty_caption": 1}


def image_bytes(w=24, h=20, seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_folder(folder, n_good=5):
    """n_good images with captions, plus one broken image, one without a caption, one with an empty
    caption; returns the good keys in the order a source yields them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n_good):
        sub = folder / ("b" if i % 2 else "a")
        sub.mkdir(exist_ok=True)
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        (sub / f"img{i}.{ext}").write_bytes(image_bytes(20 + 3 * i, 18 + i, seed=i, fmt=fmt))
        (sub / f"img{i}.txt").write_text(f"a photo of thing {i}\n")
        keys.append(f"{sub.name}/img{i}")
    (folder / "broken.png").write_bytes(image_bytes()[:40])  # truncated: fails when decoded
    (folder / "broken.txt").write_text("a broken file")
    (folder / "nocaption.png").write_bytes(image_bytes())
    (folder / "empty.png").write_bytes(image_bytes())
    (folder / "empty.txt").write_text("  \n")
    return sorted(keys)


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder):
    """Two webdataset shards with bad entries, and a third cut off in the middle."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "000.tar", "w") as tar:
        _add(tar, "s/k0.jpg", image_bytes(fmt="JPEG"))
        _add(tar, "s/k0.txt", b"first caption")
        _add(tar, "s/k1.png", image_bytes(seed=1))  # no caption
        _add(tar, "s/k2.txt", b"a caption without an image")
        _add(tar, "s/k3.webp", image_bytes(seed=3, fmt="WEBP"))
        _add(tar, "s/k3.txt", "caption with ü".encode())
        _add(tar, "s/k3.json", b"{}")
    with tarfile.open(folder / "001.tar", "w") as tar:
        _add(tar, "k4.png", b"\x89PNG not really")
        _add(tar, "k4.txt", b"broken image")
        _add(tar, "k5.png", image_bytes(seed=5))
        _add(tar, "k5.txt", b"")
        _add(tar, "k6.png", image_bytes(seed=6))
        _add(tar, "k6.txt", b"\xff\xfe not utf-8")
        _add(tar, "k7.png", image_bytes(seed=7))
        _add(tar, "k7.txt", b"last good one")
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        _add(tar, "k8.png", image_bytes(seed=8))
        _add(tar, "k8.txt", b"before the cut")
        _add(tar, "k9.png", image_bytes(64, 64, seed=9))
        _add(tar, "k9.txt", b"after the cut")
    with tarfile.open(fileobj=io.BytesIO(whole.getvalue())) as tar:
        cut = tar.getmember("k9.png").offset_data + 100
    (folder / "002.tar").write_bytes(whole.getvalue()[:cut])  # k8 whole, k9's image cut off


def test_folder_yields_good_items_and_counts_the_bad(tmp_path):
    keys = write_folder(tmp_path / "d")
    src = open_source(tmp_path / "d")
    assert isinstance(src, FolderSource)
    items = list(src)
    assert [it.key for it in items] == keys
    assert items[0].caption == "a photo of thing 0" and items[0].image.mode == "RGB"
    assert dict(src.skipped) == BAD_REASONS
    assert src.consumed == len(keys) + 3


def test_resume_continues_after_start_without_recounting(tmp_path):
    write_folder(tmp_path / "d")
    full = [it.key for it in FolderSource(tmp_path / "d")]
    src = FolderSource(tmp_path / "d")
    tail = [it.key for it in src.items(start=4)]
    assert full[-len(tail):] == tail and len(tail) < len(full)
    assert src.consumed == 8 and sum(src.skipped.values()) + len(tail) == 8 - 4


def test_tar_shards_group_members_by_key_and_survive_a_cut_shard(tmp_path):
    write_shards(tmp_path / "w")
    src = open_source(tmp_path / "w")
    assert isinstance(src, TarSource)
    items = list(src)
    assert [(it.key, it.caption) for it in items] == [
        ("s/k0", "first caption"), ("s/k3", "caption with ü"), ("k7", "last good one"), ("k8", "before the cut")]
    assert dict(src.skipped) == {"missing_caption": 1, "missing_image": 1, "broken_image": 1, "empty_caption": 1,
                                 "unreadable_caption": 1, "broken_shard": 1}
    # one shard alone, and a resume from the middle of the stream
    assert [it.key for it in open_source(tmp_path / "w" / "001.tar")] == ["k7"]
    assert [it.key for it in TarSource(tmp_path / "w").items(start=3)] == ["s/k3", "k7", "k8"]


def test_webdataset_key_naming():
    assert split_key("a/b/x.seg.png") == ("a/b/x", "seg.png")
    assert split_key("x.JPG") == ("x", "jpg")


def _dataset(path, splits=False):
    datasets = pytest.importorskip("datasets")
    rows = {"image": [{"bytes": image_bytes(seed=i), "path": None} for i in range(4)]
            + [{"bytes": b"garbage", "path": None}],
            "text": ["one", "", None, "fourth", "broken"],
            "other": [1, 2, 3, 4, 5]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "other": datasets.Value("int32")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    (datasets.DatasetDict({"train": ds, "test": ds}) if splits else ds).save_to_disk(str(path))


def test_datasets_folder(tmp_path):
    _dataset(tmp_path / "ds")
    src = open_source(tmp_path / "ds")
    assert isinstance(src, DatasetsSource) and (src.image_column, src.caption_column) == ("image", "text")
    assert [(it.key, it.caption) for it in src] == [("0", "one"), ("3", "fourth")]
    assert dict(src.skipped) == {"empty_caption": 1, "missing_caption": 1, "broken_image": 1}
    _dataset(tmp_path / "dd", splits=True)
    assert [it.caption for it in open_source(tmp_path / "dd")] == ["one", "fourth"]  # its train split
    with pytest.raises(HypersdError, match=r"no column 'caption'; its columns are \['image', 'text', 'other'\]"):
        open_source(tmp_path / "ds", caption_column="caption")


def test_datasets_caption_lists_take_the_first_non_empty(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": image_bytes(), "path": None}],
                                     "captions": [["", "the second caption"]]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [it.caption for it in open_source(tmp_path / "ds")] == ["the second caption"]


def test_datasets_missing_is_one_line_naming_the_install(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(HypersdError, match="needs the datasets library: pip install datasets"):
        open_source(tmp_path / "ds")


def test_bad_source_paths(tmp_path):
    with pytest.raises(HypersdError, match="not found"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(HypersdError, match="not a .tar shard"):
        open_source(tmp_path / "x.csv")


def _ramp(w, h):
    """Pixel (y, x) holds x in red and y in green: a crop's offset can be read off its corner."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_resize_shorter_side_and_center_crop():
    p = resize_and_crop(_ramp(64, 32), 16)  # halved to 32x16, then the middle 16 columns
    assert p.original_size == (32, 64) and p.crop_top_left == (0, 8)
    assert p.pixels.shape == (3, 16, 16) and -1 <= p.pixels.min() and p.pixels.max() <= 1
    red = (p.pixels[0] + 1) * 127.5  # the ramp's x, halved by the resize: 2 per column
    assert abs(red[8, 0].item() - 2 * 8) < 3 and abs(red[8, 15].item() - 2 * 23) < 3
    tall = resize_and_crop(_ramp(16, 40), 16)
    assert tall.original_size == (40, 16) and tall.crop_top_left == (12, 0)
    exact = resize_and_crop(_ramp(16, 16), 16)  # already the size: the pixels as they are
    assert ((exact.pixels[0] + 1) * 127.5).round()[0].tolist() == list(range(16))


def test_random_crop_is_seeded_by_item():
    img = _ramp(80, 16)
    a = resize_and_crop(img, 16, "random", crop_rng(0, "key")).crop_top_left
    assert a == resize_and_crop(img, 16, "random", crop_rng(0, "key")).crop_top_left
    corners = {resize_and_crop(img, 16, "random", crop_rng(0, f"k{i}")).crop_top_left for i in range(20)}
    assert len(corners) > 5 and all(t == 0 and 0 <= left <= 64 for t, left in corners)
    with pytest.raises(HypersdError, match="crop must be one of center, random"):
        resize_and_crop(img, 16, "corner")


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.save(tmp_path / "t.png")
    (tmp_path / "t.txt").write_text("clear")
    item = next(iter(FolderSource(tmp_path)))
    assert item.image.getpixel((0, 0)) == (255, 255, 255)
