"""Image–caption data for the real backbones: three sources, one item, one resize-and-crop.

A source is an image–caption folder (``a/b.jpg`` with ``a/b.txt`` beside it), webdataset tar
shards (``key.jpg|png|webp`` and ``key.txt`` in one tar), or a Hugging Face ``datasets`` folder
(``save_to_disk``). Each yields ``Item(image, caption, key)`` in a fixed order. An entry that cannot
be used (a broken image, a missing or empty caption, an unreadable shard) is looked at once,
counted by reason in ``source.skipped`` and passed over: the loader never retries a bad item.

``source.consumed`` counts the entries read so far, good and bad; ``items(start)`` continues
after the first ``start`` entries without decoding them, which is how a stopped cache resumes.
"""

from __future__ import annotations

import io
import random
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from hypersd.errors import HypersdError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("text", "caption", "prompt", "txt", "captions")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img")
CROPS = ("center", "random")


@dataclass
class Item:
    image: Image.Image  # decoded, RGB
    caption: str
    key: str


@dataclass
class _Entry:
    """One entry of a source before it is checked: ``image()`` gives bytes or a path."""

    key: str
    image: Callable[[], bytes | str | Path] | None
    caption: str | bytes | None
    problem: str | None = None  # set when the entry is known bad before it is opened


class Source:
    """The entries of one data source, checked and counted; iterate ``items()``."""

    kind = "source"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped: Counter = Counter()
        self.consumed = 0

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def items(self, start: int = 0) -> Iterator[Item]:
        self.consumed = start
        for entry in self._entries(start):
            self.consumed += 1
            item, problem = _check(entry)
            if problem:
                self.skipped[problem] += 1
            else:
                yield item

    def _entries(self, start: int) -> Iterator[_Entry]:
        raise NotImplementedError


def _check(entry: _Entry) -> tuple[Item | None, str | None]:
    """The entry as an item, or the reason it cannot be one."""
    if entry.problem:
        return None, entry.problem
    if entry.caption is None:
        return None, "missing_caption"
    caption = entry.caption
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None, "unreadable_caption"
    caption = caption.strip()
    if not caption:
        return None, "empty_caption"
    try:
        image = open_image(entry.image())
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, "broken_image"
    return Item(image, caption, entry.key), None


def open_image(data: bytes | str | Path) -> Image.Image:
    """Decode fully (a truncated file fails here, not later in a batch), upright, as RGB."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # transparent pixels carry arbitrary colours: show them on white, as a viewer would
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


# -- the three sources ------------------------------------------------------------------------
class FolderSource(Source):
    """Images anywhere under a folder, each with its caption in a .txt of the same name."""

    kind = "folder"

    def _entries(self, start):
        files = sorted(p for p in self.path.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTS
                       and p.is_file() and not p.name.startswith("."))
        for p in files[start:]:
            txt = p.with_suffix(".txt")
            caption = txt.read_bytes() if txt.is_file() else None
            yield _Entry(p.relative_to(self.path).with_suffix("").as_posix(), lambda p=p: p, caption)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's naming: ``dir/key.ext`` where the extension starts at the first dot of the base."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class TarSource(Source):
    """webdataset shards: members with the same key, one after another, make one entry."""

    kind = "tar"

    def __init__(self, path):
        super().__init__(path)
        self.shards = [self.path] if self.path.is_file() else sorted(self.path.glob("*.tar"))

    def _entries(self, start):
        index = 0
        for shard in self.shards:
            for entry in _shard_entries(shard):
                if index >= start:
                    yield entry
                index += 1


def _shard_entries(shard: Path) -> Iterator[_Entry]:
    """Streamed, so a shard is never held in memory; a damaged one is one ``broken_shard`` entry
    after whatever could be read before the damage."""
    key, files = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key and key is not None:
                    yield _group(key, files)
                    files = {}
                key = k
                files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        yield _Entry(shard.name, None, None, problem="broken_shard")
        return
    if key is not None:
        yield _group(key, files)


def _group(key: str, files: dict[str, bytes]) -> _Entry:
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return _Entry(key, None, None, problem="missing_image")
    return _Entry(key, lambda: files[ext], files.get("txt"))


class DatasetsSource(Source):
    """A local Hugging Face ``datasets`` folder (written by ``save_to_disk``); its ``train`` split
    when it holds several."""

    kind = "datasets"

    def __init__(self, path, image_column: str | None = None, caption_column: str | None = None):
        super().__init__(path)
        try:
            import datasets
        except ImportError:
            raise HypersdError(f"{path} is a Hugging Face datasets folder; reading it needs the datasets "
                               f"library: pip install datasets") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise HypersdError(f"cannot read the datasets folder {path}: {reason}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise HypersdError(f"{path} holds splits {sorted(ds)} and no 'train'; save the split to use "
                                   f"with save_to_disk, or name it train")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        self.image_column = _column(ds, image_column, IMAGE_COLUMNS, "image", path,
                                    lambda f: isinstance(f, datasets.Image))
        self.caption_column = _column(ds, caption_column, CAPTION_COLUMNS, "caption", path)
        if isinstance(ds.features[self.image_column], datasets.Image):
            # undecoded, so a broken image is ours to count instead of an exception inside datasets
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds = ds

    def _entries(self, start):
        rows = self.ds.select_columns([self.image_column, self.caption_column])
        for i in range(start, len(rows)):
            row = rows[i]
            image, caption = _row_image(row[self.image_column]), _row_caption(row[self.caption_column])
            yield _Entry(str(i), (lambda image=image: image) if image is not None else None, caption,
                         None if image is not None else "missing_image")


def _column(ds, name, candidates, what, path, is_kind=lambda f: False) -> str:
    columns = list(ds.column_names)
    if name is not None:
        if name not in columns:
            raise HypersdError(f"{path} has no column {name!r}; its columns are {columns}")
        return name
    found = [c for c in columns if is_kind(ds.features[c])] + [c for c in candidates if c in columns]
    if not found:
        raise HypersdError(f"{path}: no {what} column among {columns}; name it with --{what}-column")
    return found[0]


def _row_image(value):
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes", "path"}
        return value.get("bytes") or value.get("path")
    return value if isinstance(value, (bytes, str)) and value else None


def _row_caption(value) -> str | None:
    if isinstance(value, (list, tuple)):  # several captions per image: the first non-empty one
        value = next((v for v in value if isinstance(v, str) and v.strip()), "" if value else None)
    return value if isinstance(value, str) else None


def open_source(path: str | Path, image_column: str | None = None, caption_column: str | None = None) -> Source:
    """The source at ``path``: a datasets folder (it has dataset_info.json or dataset_dict.json),
    a .tar shard or a folder of them, or else a folder of images with .txt captions."""
    p = Path(path).expanduser()
    if not p.exists():
        raise HypersdError(f"data source {path} not found; pass a folder of images with .txt captions, a .tar "
                           f"shard or a folder of them, or a datasets folder written by save_to_disk")
    if p.is_file():
        if p.suffix == ".tar":
            return TarSource(p)
        raise HypersdError(f"data source {path} is a file but not a .tar shard; pass a .tar or a folder")
    if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
        return DatasetsSource(p, image_column, caption_column)
    if any(p.glob("*.tar")):
        return TarSource(p)
    return FolderSource(p)


# -- to the training resolution ---------------------------------------------------------------
@dataclass
class Prepared:
    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing: SDXL's first time ids
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image: SDXL's next two


def crop_rng(seed: int, key: str) -> random.Random:
    """A crop's randomness from the run's seed and the item's key alone, so that a resumed cache
    crops each item as the uninterrupted one would have."""
    return random.Random(f"{seed}:{key}")


def resize_and_crop(image: Image.Image, resolution: int | tuple[int, int], crop: str = "center",
                    rng: random.Random | None = None) -> Prepared:
    """Scaled to cover ``resolution`` (a square's side, or a bucket's (height, width)), then cut
    to it (centred or at random) along the side that is left over."""
    if crop not in CROPS:
        raise HypersdError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    th, tw = (resolution, resolution) if isinstance(resolution, int) else resolution
    w, h = image.size
    scale = max(tw / w, th / h)
    size = (max(tw, round(w * scale)), max(th, round(h * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS) if size != (w, h) else image
    spare_w, spare_h = size[0] - tw, size[1] - th
    if crop == "random":
        rng = rng or random.Random()
        top, left = rng.randint(0, spare_h), rng.randint(0, spare_w)
    else:
        top, left = spare_h // 2, spare_w // 2
    patch = resized.crop((left, top, left + tw, top + th))
    pixels = torch.from_numpy(np.asarray(patch, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return Prepared(pixels, (h, w), (top, left))
