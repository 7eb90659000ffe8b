"""The latent cache: VAE latents and prompt embeddings computed once, read by every training step.

``hypersd cache`` runs the teacher's VAE and prompt encoder over a data source (``imagedata``)
and writes, in its output folder:

- ``shard-NNNNN.safetensors``: ``latents`` [n, C, h, w] and ``hidden`` [n, L, D], for SDXL also
  ``text_embeds`` [n, P] (pooled) and ``time_ids`` [n, 6] (original size, crop, target size), for
  SD3 and FLUX (16-channel latents after the VAE's shift and scale) ``pooled_projections`` [n, P]
  (SD3's ``hidden``: both CLIPs' states, then T5's; FLUX's: T5's); the rows' captions and keys in
  its metadata, with each row's original size, crop and target size;
  with ``--buckets`` (aspect-ratio buckets, ``data.buckets``) a shard's latents are one tensor
  ``latents-{H}x{W}`` per bucket, its rows in the shard's order;
- ``probe.safetensors``: the encoding of one fixed prompt, which a reader compares with its own
  teacher's, so a cache made with another text encoder is refused instead of trained on;
- ``manifest.json``: backbone, model, resolution, shapes, the shards in order, the items written
  and the ones skipped by reason.

A shard is written whole (atomic rename) before the manifest names it, and readers read only the
shards the manifest names: a killed run leaves nothing half-written that a reader would take, and
the same command run again continues after the last shard it finished.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hypersd.data.buckets import (
    DEFAULT_MAX_RATIO,
    DEFAULT_STEP,
    BucketBatches,
    bucket_name,
    check_buckets,
    latent_rule,
    make_buckets,
    nearest_bucket,
)
from hypersd.data.images import crop_rng, open_source, resize_and_crop
from hypersd.device import resolve_device
from hypersd.errors import HypersdError
from hypersd.outputs import atomic_path, write_text
from hypersd.teachers.base import Cond

MANIFEST, PROBE = "manifest.json", "probe.safetensors"
PROBE_PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
EMBEDDINGS = ("hidden", "text_embeds", "pooled_projections")  # what _read hands over in the network's dtype
BACKBONES = ("sd15", "sdxl", "sd3", "flux")
# What a resumed run must share with the one it continues.
SETTINGS = ("backbone", "model", "vae", "data", "resolution", "crop", "seed", "dtype", "shard_size",
            "image_column", "caption_column", "max_sequence_length", "no_t5_cache", "bucketing",
            "model_config")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def describe_skips(skipped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"


# -- writing ----------------------------------------------------------------------------------
def build_cache(backbone: str, model: str, data: str, out: str | Path, *, resolution: int | None = None,
                batch: int = 8, shard_size: int = 1000, crop: str = "center", seed: int = 0, vae: str | None = None,
                dtype: str = "float16", image_column: str | None = None, caption_column: str | None = None,
                device: str | None = None, force: bool = False, teacher=None, progress: bool = True,
                max_sequence_length: int | None = None, t5: bool = True, buckets: bool = False,
                bucket_step: int | None = None, bucket_max_ratio: float | None = None,
                model_config: str | None = None) -> dict:
    """Write (or continue) the cache of ``data`` for ``model``; returns its manifest.

    ``max_sequence_length``: SD3's and FLUX's T5 tokens (default the model's: 256, FLUX.1-dev 512);
    the manifest records the teacher's, and training loads its teacher with it. ``t5`` False
    (``--no-t5-cache``): their T5 states are not stored but encoded at each training step.
    ``buckets``: each image goes to the aspect-ratio bucket nearest its own (``data.buckets``), of
    about the square's area, sides multiples of ``bucket_step`` pixels (64), ratios up to
    ``bucket_max_ratio`` (2); else every image is cut to the square.
    ``model_config``: for an SD3 / FLUX ``model`` that is one .safetensors file, its diffusers folder
    (the recipe's ``teacher_config``)."""
    from tqdm.auto import tqdm

    if backbone not in BACKBONES:
        raise HypersdError(f"hypersd cache serves the {', '.join(BACKBONES)} backbones, not {backbone!r}; digits "
                           f"trains on its own split")
    if batch < 1 or shard_size < 1:
        raise HypersdError("--batch and --shard-size must be at least 1")
    if dtype not in DTYPES:
        raise HypersdError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_sequence_length is not None and backbone not in ("sd3", "flux"):
        raise HypersdError(f"--max-sequence-length is T5's length, for sd3 and flux; {backbone} has no T5")
    if not t5 and backbone not in ("sd3", "flux"):
        raise HypersdError(f"--no-t5-cache is for sd3 and flux; {backbone} has no T5")
    if not buckets and (bucket_step is not None or bucket_max_ratio is not None):
        raise HypersdError("--bucket-step and --bucket-max-ratio shape the aspect-ratio buckets; pass --buckets too")
    if model_config is not None and backbone not in ("sd3", "flux"):
        raise HypersdError(f"--model-config is for an sd3 or flux checkpoint file; {backbone} caches from a diffusers "
                           f"folder or hub id")
    out = Path(out)
    source = open_source(data, image_column, caption_column)
    settings = {"backbone": backbone, "model": str(model), "vae": vae, "data": str(Path(data).expanduser().resolve()),
                "resolution": resolution, "crop": crop, "seed": seed, "dtype": dtype, "shard_size": shard_size,
                "image_column": image_column, "caption_column": caption_column,
                "max_sequence_length": max_sequence_length, "no_t5_cache": None if t5 else True,
                "bucketing": {"step": bucket_step or DEFAULT_STEP, "max_ratio": float(bucket_max_ratio or DEFAULT_MAX_RATIO)}
                if buckets else None,
                "model_config": model_config}
    manifest = _start(out, settings, force)  # refuses what it must before a model is loaded
    if teacher is None:
        from hypersd.teachers import load_teacher

        # FLUX's shift depends on the image size: the teacher is the one a recipe at this resolution trains
        options = {"resolution": resolution} if backbone == "flux" and resolution else {}
        if max_sequence_length is not None:
            options["max_sequence_length"] = max_sequence_length
        if model_config is not None:
            options["config"] = model_config
        teacher = load_teacher(backbone, model, device=resolve_device(device), **options)
    if vae:
        from hypersd.teachers.sd import replace_vae

        replace_vae(teacher, vae)
    if manifest is None:
        manifest = _fresh(out, settings, teacher)
    writer = _Writer(out, manifest, teacher, source)
    bar = tqdm(desc="cache", unit="item", initial=manifest["written"], disable=not progress)
    items = source.items(start=manifest["consumed"])
    while True:
        chunk = list(islice(items, min(batch, shard_size - len(writer))))
        bar.update(writer.add(chunk))
        if len(writer) >= shard_size or (not chunk and len(writer)):
            writer.flush()
        if not chunk:
            break
    bar.close()
    manifest["consumed"] = source.consumed  # every row is in a shard now: the counts agree with it
    writer.save_manifest()
    if not manifest["written"]:  # left unfinished: the same command, on fixed data, starts it again
        raise HypersdError(f"no usable items in {data} (skipped: {describe_skips(manifest['skipped'])}); each image "
                           f"needs a non-empty caption (.txt beside it, or the caption column)")
    manifest["complete"] = True
    writer.save_manifest()
    return manifest


def _start(out: Path, settings: dict, force: bool) -> dict | None:
    """The manifest of a partial cache to continue, or None to start afresh (after clearing ours)."""
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise HypersdError(f"--out {out} is a file; the cache is a folder")
    if manifest.is_file() and not force:
        m = read_manifest(out, complete=False)
        if m.get("complete"):
            raise HypersdError(f"{out} already holds a complete cache ({m['written']} items); pass --force to "
                               f"rebuild it, or choose another --out")
        changed = [k for k in SETTINGS if m.get(k) != settings[k] and not (k == "resolution" and settings[k] is None)]
        if changed:
            raise HypersdError(f"{out} holds a partial cache made with other settings ({', '.join(changed)}); pass "
                               f"the same arguments to continue it, or --force to start over")
        for tmp in [*out.glob(".shard-*.tmp-*"), *out.glob(f".{PROBE}.tmp-*"), *out.glob(f".{MANIFEST}.tmp-*")]:
            tmp.unlink(missing_ok=True)  # what a killed run was writing: it is written again
        return m
    if out.is_dir() and any(out.iterdir()) and not manifest.is_file() and not force:
        raise HypersdError(f"{out} is not empty and holds no hypersd cache; choose an empty or new --out, or pass "
                           f"--force to write the cache among its files")
    if force:  # only what a cache writes: other files in the folder are the user's
        for p in [*out.glob("shard-*.safetensors"), out / PROBE, manifest]:
            p.unlink(missing_ok=True)
    return None


def _fresh(out: Path, settings: dict, teacher) -> dict:
    resolution = settings["resolution"] or teacher.resolution[0]
    factor = teacher.vae_scale_factor
    if resolution % factor or resolution < factor:
        raise HypersdError(f"--resolution {resolution} must be a multiple of the VAE's factor {factor}")
    if settings["bucketing"]:
        sizes = bucket_sizes_for(teacher, resolution, settings["bucketing"])
    probe = teacher.encode_prompt([PROBE_PROMPT])
    m = {"kind": "hypersd-cache", "version": 1, **settings, "resolution": resolution,
         "latent_shape": [teacher.latent_shape[0], resolution // factor, resolution // factor],
         "pooled_dim": int(probe.added["text_embeds"].shape[-1]) if "text_embeds" in probe.added else None,
         "added": sorted(probe.added),
         "t5_length": getattr(teacher, "max_sequence_length", None),  # what a trainer loads its teacher with
         # without T5, SD3's CLIP tokens are stored this wide: the rest of their row is zeros
         "clip_width": getattr(teacher, "clip_width", None) if settings["no_t5_cache"] else None,
         "written": 0, "consumed": 0, "skipped": {}, "shards": [], "complete": False}
    stored = _stored(probe, DTYPES[settings["dtype"]], m)
    m["hidden_shape"] = list(stored["hidden"].shape[1:]) if "hidden" in stored else None  # None: FLUX without T5
    dtype, c = DTYPES[settings["dtype"]], teacher.latent_shape[0]
    m["bytes_per_item"] = _bytes_per_item(c, (resolution // factor,) * 2, stored, dtype)
    if settings["bucketing"]:  # the square's latent_shape above stays the area's reference
        m["buckets"] = [{"height": h, "width": w, "items": 0,
                         "bytes_per_item": _bytes_per_item(c, (h // factor, w // factor), stored, dtype)}
                        for h, w in sizes]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PROBE) as tmp:
        save_file(_tensors(probe, torch.float32), str(tmp))
    write_text(out / MANIFEST, json.dumps(m, indent=1))
    return m


def bucket_sizes_for(teacher, resolution: int, bucketing: dict) -> list[tuple[int, int]]:
    """The (height, width) buckets of a cache at ``resolution``, checked against the teacher's network."""
    multiple = teacher.vae_scale_factor * latent_rule(teacher)[0]
    sizes = make_buckets(resolution, bucketing["step"], bucketing["max_ratio"], multiple)
    check_buckets(teacher, sizes, "--buckets")
    return sizes


def _sizes(manifest: dict) -> list[tuple[int, int]]:
    """A cache's (height, width) sizes: a bucketed one's buckets, in the manifest's order; else the square."""
    if not manifest.get("bucketing"):
        return [(manifest["resolution"], manifest["resolution"])]
    return [(b["height"], b["width"]) for b in manifest["buckets"]]


def _latents_name(manifest: dict, size) -> str:
    """The shard tensor that holds the latents of ``size``: its bucket's, or a square cache's ``latents``."""
    return bucket_name(size) if manifest.get("bucketing") else "latents"


def _bytes_per_item(channels: int, hw: tuple[int, int], t: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """What one cached item takes in a shard: its latents of ``hw`` (latent height, width) and its
    prompt's stored tensors ``t`` (SD3's and FLUX's are mostly T5's sequence)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return channels * hw[0] * hw[1] * size + sum(v[0].numel() * v.element_size() for v in t.values())


def _mean_bytes(m: dict) -> None:
    """A bucketed cache's ``bytes_per_item``: the mean over the items its shards hold, each at its
    bucket's figure (a bucket's area is at most the square's, whose figure it is until an item is
    written). A partial cache begun before the buckets had figures keeps the square's, and a square
    cache its own."""
    buckets = m.get("buckets") or []
    if buckets and m["written"] and all("bytes_per_item" in b for b in buckets):
        m["bytes_per_item"] = round(sum(b["items"] * b["bytes_per_item"] for b in buckets) / m["written"])


def _tensors(cond: Cond, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = {"hidden": cond.hidden.to(dtype)}
    if "text_embeds" in cond.added:
        t["text_embeds"] = cond.added["text_embeds"].to(dtype)
        t["time_ids"] = cond.added["time_ids"].float()  # sizes up to thousands: float16 would round them
    if "pooled_projections" in cond.added:  # SD3's and FLUX's pooled CLIP vector
        t["pooled_projections"] = cond.added["pooled_projections"].to(dtype)
    return {k: v.detach().cpu().contiguous() for k, v in t.items()}


def _stored(cond: Cond, dtype: torch.dtype, manifest: dict) -> dict[str, torch.Tensor]:
    """What a shard holds of ``cond``: all of it, or (``no_t5_cache``) all but T5's states, the end
    of the sequence (SD3 keeps its CLIP tokens, without the zeros that pad them to T5's width;
    FLUX's sequence is T5's alone: no ``hidden``)."""
    t = _tensors(cond, dtype)
    if manifest.get("no_t5_cache"):
        clip = t["hidden"][:, : t["hidden"].shape[1] - manifest["t5_length"], : manifest.get("clip_width")]
        t.pop("hidden")
        if clip.shape[1]:
            t["hidden"] = clip.contiguous()
    return t


def _added_names(manifest: dict) -> tuple[str, ...]:
    """The conditioning besides ``hidden`` that a cache's shards hold (caches made before SD3 and FLUX
    name none: SDXL's is known by its pooled size)."""
    if "added" in manifest:
        return tuple(manifest["added"])
    return ("text_embeds", "time_ids") if manifest["pooled_dim"] else ()


class _Writer:
    """Rows of the shard being filled; ``flush`` writes it and then the manifest that names it."""

    def __init__(self, out: Path, manifest: dict, teacher, source):
        self.out, self.m, self.teacher, self.source = out, manifest, teacher, source
        self.dtype = DTYPES[manifest["dtype"]]
        self.skipped_before = Counter(manifest["skipped"])
        self.wrong_size = 0
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.captions: list[str] = []
        self.keys: list[str] = []
        self.sizes: list[dict] = []  # each row's original size, crop and target size (the bucket)

    def __len__(self) -> int:
        return len(self.captions)

    @torch.no_grad()
    def add(self, items) -> int:
        """Encode a batch of items into the shard; returns how many rows it kept."""
        if not items:
            return 0
        m = self.m
        sizes = _sizes(m)
        targets = [sizes[nearest_bucket(sizes, *it.image.size)] for it in items]
        prepared = [resize_and_crop(it.image, tgt, m["crop"], crop_rng(m["seed"], it.key))
                    for it, tgt in zip(items, targets)]
        latents = self._encode(prepared, targets)
        keep = [i for i in range(len(items)) if latents[i] is not None]
        self.wrong_size += len(items) - len(keep)
        if not keep:
            return 0
        items, prepared, targets = [items[i] for i in keep], [prepared[i] for i in keep], [targets[i] for i in keep]
        captions = [it.caption for it in items]
        if "time_ids" in _added_names(m):  # SDXL: each image's own size and crop in its time ids
            cond = self.teacher.encode_prompt(captions, size=[p.original_size for p in prepared],
                                              crop=[p.crop_top_left for p in prepared],
                                              target=targets if m.get("bucketing") else None)
        else:
            cond = self.teacher.encode_prompt(captions)
        rows = {}
        for i, tgt in enumerate(targets):  # one tensor per bucket; a square cache's is ``latents``
            rows.setdefault(_latents_name(m, tgt), []).append(latents[keep[i]])
        rows = {k: torch.cat(v).to(self.dtype).cpu() for k, v in rows.items()}
        for name, v in {**rows, **_stored(cond, self.dtype, m)}.items():
            self.rows.setdefault(name, []).append(v)
        self.captions += captions
        self.keys += [it.key for it in items]
        self.sizes += [{"original_size": list(p.original_size), "crop_top_left": list(p.crop_top_left),
                        "target_size": list(tgt)} for p, tgt in zip(prepared, targets)]
        return len(items)

    def _encode(self, prepared, targets) -> list[torch.Tensor | None]:
        """Each item's latents [1, C, h, w], the VAE run once per target size; None for the rows of
        a size the VAE did not shrink as its config says."""
        c, factor = self.m["latent_shape"][0], self.m["resolution"] // self.m["latent_shape"][1]
        out: list[torch.Tensor | None] = [None] * len(prepared)
        for tgt in dict.fromkeys(targets):
            rows = [i for i, t in enumerate(targets) if t == tgt]
            z = self.teacher.encode(torch.stack([prepared[i].pixels for i in rows]))
            if list(z.shape[1:]) == [c, tgt[0] // factor, tgt[1] // factor]:
                for i, row in zip(rows, z.split(1)):
                    out[i] = row
        return out

    def flush(self) -> None:
        m = self.m
        name = shard_name(len(m["shards"]))
        tensors = {k: torch.cat(v).contiguous() for k, v in self.rows.items()}
        meta = {"kind": "hypersd-cache-shard", "captions": self.captions, "keys": self.keys,
                **{k: [row[k] for row in self.sizes] for k in ("original_size", "crop_top_left", "target_size")}}
        with atomic_path(self.out / name) as tmp:
            save_file(tensors, str(tmp), metadata={"hypersd": json.dumps(meta)})
        m["shards"].append({"file": name, "rows": len(self)})
        m["written"] += len(self)
        m["consumed"] = self.source.consumed
        for b in m.get("buckets") or []:  # the items each bucket holds, as the named shards hold them
            b["items"] += sum(row["target_size"] == [b["height"], b["width"]] for row in self.sizes)
        _mean_bytes(m)
        self.save_manifest()
        self.rows, self.captions, self.keys, self.sizes = {}, [], [], []

    def save_manifest(self) -> None:
        skipped = self.skipped_before + self.source.skipped + Counter({"wrong_size": self.wrong_size})
        self.m["skipped"] = dict(sorted(skipped.items()))
        write_text(self.out / MANIFEST, json.dumps(self.m, indent=1))


# -- reading ----------------------------------------------------------------------------------
def read_manifest(folder: str | Path, complete: bool = True) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        what = "not found" if not folder.exists() else "has no manifest.json"
        raise HypersdError(f"cache {folder} {what}; write one with 'hypersd cache --backbone B --model M --data SRC "
                           f"--out {folder}'")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HypersdError(f"{path} is not a readable cache manifest ({e}); rebuild the cache with --force") from None
    if not isinstance(m, dict) or m.get("kind") != "hypersd-cache":
        raise HypersdError(f"{path} is not a hypersd cache manifest; rebuild the cache with --force")
    if complete and not m.get("complete"):
        raise HypersdError(f"cache {folder} is unfinished ({m.get('written', 0)} items so far); run the same "
                           f"'hypersd cache' command again to finish it")
    return m


class CachedData:
    """Training batches from a cache. ``batch`` gives (latents, prompts), as every data source does;
    ``batch_cond`` adds the prompts' conditioning, so no text encoder runs per step."""

    def __init__(self, folder: str | Path, backbone: str | None = None):
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        if backbone is not None and m["backbone"] != backbone:
            raise HypersdError(f"cache {folder} was made for backbone {m['backbone']}, not {backbone}; cache the data "
                               f"with --backbone {backbone} and this recipe's teacher")
        self.skipped: Counter = Counter()
        self.captions: list[str] = []
        self.shards: list[Path] = []
        # (shard, row, latents tensor, row in it) of each usable item, in captions' order
        self.index: list[tuple[int, int, str, int]] = []
        self.bucket_of: list[int] = []  # each item's bucket (a square cache: all 0)
        c, side = m["latent_shape"][0], m["latent_shape"][1]
        factor = m["resolution"] // side
        self.sizes = _sizes(m)
        self.latent_shapes = {_latents_name(m, hw): [c, hw[0] // factor, hw[1] // factor] for hw in self.sizes}
        for entry in m["shards"]:
            self._index_shard(self.folder / entry["file"], entry["rows"])
        if not self.index:
            raise HypersdError(f"cache {folder} has no usable items (skipped: {describe_skips(self.skipped)}); "
                               f"rebuild it with 'hypersd cache ... --force'")
        # a bucketed cache's batches are of one bucket each; a square one's are uniform draws, as ever
        self.sampler = None
        if m.get("bucketing"):
            groups = [[] for _ in self.sizes]
            for i, b in enumerate(self.bucket_of):
                groups[b].append(i)
            self.sampler = BucketBatches(groups)
        self.teacher = None

    def __len__(self) -> int:
        return len(self.index)

    def bucket_counts(self) -> dict[str, int]:
        """{"WxH": usable items} of each bucket that holds any."""
        counts = Counter(self.bucket_of)
        return {f"{w}x{h}": counts[b] for b, (h, w) in enumerate(self.sizes) if counts[b]}

    def _index_shard(self, path: Path, rows: int) -> None:
        """Index a shard's rows, or skip and count them all: a shard is one write, so its rows are
        all usable or none is."""
        m = self.manifest
        want = {"hidden": m["hidden_shape"]} if m["hidden_shape"] else {}
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("hypersd", "{}"))
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception:  # a missing or damaged file: safetensors raises its own error types
            self.skipped["unreadable_shard"] += rows
            return
        captions = meta.get("captions") or []
        placed = self._row_latents(meta, rows)
        counts = Counter(name for name, _, _ in placed or [])
        if placed is None or len(captions) != rows or any(shapes.get(k, [None])[0] != rows for k in want) \
                or any(shapes.get(k, [None])[0] != n for k, n in counts.items()):
            self.skipped["unreadable_shard"] += rows
            return
        want |= {k: self.latent_shapes[k] for k in counts}
        if any(list(shapes[k][1:]) != v for k, v in want.items()):
            self.skipped["wrong_size"] += rows
            return
        self.index += [(len(self.shards), r, name, pos) for r, (name, pos, _) in enumerate(placed)]
        self.bucket_of += [b for _, _, b in placed]
        self.shards.append(path)
        self.captions += captions

    def _row_latents(self, meta: dict, rows: int) -> list[tuple[str, int, int]] | None:
        """(latents tensor, row in it, bucket) of each of a shard's rows, None where its metadata
        does not place them: a square cache's rows are those of ``latents``, a bucketed one's
        those of their bucket's tensor, in the shard's order."""
        if not self.manifest.get("bucketing"):
            return [("latents", r, 0) for r in range(rows)]
        targets, ids = meta.get("target_size"), {hw: b for b, hw in enumerate(self.sizes)}
        if not isinstance(targets, list) or len(targets) != rows:
            return None
        seen: Counter = Counter()
        out = []
        for t in targets:
            hw = tuple(t) if isinstance(t, list) else None
            if hw not in ids:
                return None
            name = bucket_name(hw)
            out.append((name, seen[name], ids[hw]))
            seen[name] += 1
        return out

    def attach(self, teacher) -> "CachedData":
        """Check the cache against the teacher that will train on it; refuse a mismatch."""
        m = self.manifest
        if tuple(m["latent_shape"]) != tuple(teacher.latent_shape):
            raise HypersdError(
                f"cache {self.folder} holds latents {m['latent_shape']} (resolution {m['resolution']}), but the "
                f"teacher denoises {list(teacher.latent_shape)}; cache the data again at the teacher's resolution")
        if m.get("bucketing"):  # every bucket, not only the square, must suit the network
            check_buckets(teacher, self.sizes, f"cache {self.folder}")
        with torch.no_grad():
            probe = _tensors(teacher.encode_prompt([PROBE_PROMPT]), torch.float32)
        stored = _read_probe(self.folder / PROBE)
        if probe.keys() != stored.keys() or any(probe[k].shape != stored[k].shape for k in probe):
            raise HypersdError(f"cache {self.folder} holds prompt embeddings of another shape than this teacher's "
                               f"({m['model']}); cache the data with the recipe's teacher")
        for k in EMBEDDINGS:
            if k in probe and not _close(probe[k], stored[k]):
                raise HypersdError(f"cache {self.folder} was encoded by another text encoder ({m['model']}) than the "
                                   f"teacher's; cache the data with the recipe's teacher as --model")
        self.teacher = teacher
        return self

    def draw(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` item indices: uniform over the items, or (bucketed) all of one bucket (``BucketBatches``)."""
        if self.sampler is not None:
            return self.sampler.draw(n, generator)
        return torch.randint(0, len(self.index), (n,), generator=generator).tolist()

    def batch(self, n: int, generator: torch.Generator):
        idx = self.draw(n, generator)
        return self._read(idx, ("latents",))["latents"], [self.captions[i] for i in idx]

    def batch_cond(self, n: int, generator: torch.Generator):
        """(latents, prompts, cond): the draw of ``batch`` with its conditioning from the cache."""
        idx = self.draw(n, generator)
        m, added_names = self.manifest, _added_names(self.manifest)
        t = self._read(idx, ("latents", *(("hidden",) if m["hidden_shape"] else ()), *added_names))
        prompts = [self.captions[i] for i in idx]
        hidden = t.get("hidden")
        if m.get("no_t5_cache"):  # T5's states, encoded now, end the sequence
            if self.teacher is None:
                raise HypersdError(f"cache {self.folder} holds no T5 states; attach the teacher to encode them")
            t5 = self.teacher.encode_t5(prompts)
            if hidden is not None:  # SD3's CLIP tokens, padded back to T5's width with the zeros they had
                hidden = torch.nn.functional.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1]))
            hidden = t5 if hidden is None else torch.cat([hidden, t5], dim=1)
        return t["latents"], prompts, Cond(hidden, {k: t[k] for k in added_names})

    def _read(self, idx: list[int], names) -> dict[str, torch.Tensor]:
        by_shard: dict[int, list[tuple[int, tuple[int, str, int]]]] = {}
        for pos, i in enumerate(idx):
            shard, *where = self.index[i]
            by_shard.setdefault(shard, []).append((pos, where))
        out: dict[str, list] = {k: [None] * len(idx) for k in names}
        for shard, rows in by_shard.items():
            with safe_open(str(self.shards[shard]), "pt") as f:
                parts: dict = {}
                for k in names:
                    for pos, (row, tensor, at) in rows:  # latents: the tensor of the row's bucket
                        name, r = (tensor, at) if k == "latents" else (k, row)
                        if name not in parts:
                            parts[name] = f.get_slice(name)
                        out[k][pos] = parts[name][r:r + 1]
        device, dtype = (self.teacher.device, self.teacher.dtype) if self.teacher else ("cpu", torch.float32)
        # Embeddings as encode_prompt gives them (the network's dtype); latents and size/crop ids in
        # float32, as the solver and the UNet's size embedding compute with them.
        return {k: torch.cat(v).to(device, dtype if k in EMBEDDINGS else torch.float32) for k, v in out.items()}


def _read_probe(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # missing or damaged
        raise HypersdError(f"{path} is missing or damaged; rebuild the cache with --force") from None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the cache's float16 storage and another device's arithmetic; another encoder is
    nowhere near."""
    return bool((a - b).abs().max() <= 1e-2 * b.abs().max() + 1e-3)
