"""``hypersd eval --images DIR | --model M``: the paper's image metrics on real images.

The reward scores of the paper's tables (CLIP score, aesthetic score, ImageReward, HPSv2,
PickScore) come from ``hypersd.rewards``, the same models feedback learning trains against; FID is
torchmetrics' ``FrechetInceptionDistance``. Images stream through in batches, so 5,000 images at
1024² never sit in memory together. Reference images are resized (shorter side) and centre-cropped
to the evaluated images' size: FID compares both at the model's resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from hypersd.errors import HypersdError

if TYPE_CHECKING:  # annotations only: torch is imported where it runs
    import torch

IMAGE_REWARDS = ("clip", "aesthetic", "imagereward", "hpsv2", "pickscore")
DEFAULT_REWARDS = ("clip",)  # the one whose public weights load with no extra file
FID_FEATURES = (64, 192, 768, 2048)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


# -- images and prompts -----------------------------------------------------------------------
def list_images(folder: str | Path, what: str = "--images") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise HypersdError(f"{what} {folder} is not a folder; pass a folder of images "
                           f"({', '.join(IMAGE_EXTS)})")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise HypersdError(f"{what} {folder} holds no image ({', '.join(IMAGE_EXTS)})")
    return files


def image_prompts(files: list[Path], prompts_file: str | Path | None = None) -> list[str]:
    """One prompt per image: the prompt file's lines in file-name order, else each PNG's own
    ``prompt`` metadata (what ``hypersd generate`` writes)."""
    from PIL import Image

    from hypersd.inference.jobs import read_prompts

    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
        if len(prompts) != len(files):
            raise HypersdError(f"{prompts_file} has {len(prompts)} prompts for {len(files)} images; give one "
                               f"prompt per image, in file-name order")
        return prompts
    prompts = []
    for f in files:
        with Image.open(f) as im:
            prompt = getattr(im, "text", {}).get("prompt")
        if not prompt:
            raise HypersdError(f"{f} has no prompt in its metadata; pass --prompts FILE with one line per image "
                               f"(in file-name order)")
        prompts.append(prompt)
    return prompts


def load_image(path: Path, size: tuple[int, int] | None = None) -> "torch.Tensor":
    """RGB uint8 [3, H, W]; with ``size`` (h, w): shorter side resized, then centre-cropped to it."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise HypersdError(f"cannot read image {path} ({e}); remove it or replace it") from None
    if size is not None and (im.height, im.width) != tuple(size):
        im = ImageOps.fit(im, (size[1], size[0]), method=Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def batches(files: list[Path], batch_size: int, size) -> Iterator[tuple[int, "torch.Tensor"]]:
    """(start index, uint8 images [B, 3, h, w]) over ``files``."""
    import torch

    for i in range(0, len(files), batch_size):
        yield i, torch.stack([load_image(f, size) for f in files[i:i + batch_size]])


def to_unit(images_u8: "torch.Tensor") -> "torch.Tensor":
    """uint8 images as the [-1, 1] floats rewards take."""
    return images_u8.float() / 127.5 - 1


# -- rewards ------------------------------------------------------------------------------------
def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise HypersdError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def reward_settings(names: list[str], paths: list[str], options: list[str]) -> dict[str, dict]:
    """{reward: {"path": ..., option: value}} from ``--reward-path NAME=PATH`` and
    ``--reward-option NAME.KEY=VALUE``; a setting for a reward not asked for is refused."""
    unknown = [n for n in names if n not in IMAGE_REWARDS]
    if unknown:
        raise HypersdError(f"unknown image reward {unknown[0]!r}; choose from {', '.join(IMAGE_REWARDS)}")
    settings: dict[str, dict] = {n: {} for n in names}
    for name, path in parse_assignments(paths, "--reward-path").items():
        if name not in settings:
            raise HypersdError(f"--reward-path {name}=... names a reward not in --rewards ({', '.join(names) or 'none'})")
        settings[name]["path"] = path
    for key, value in parse_assignments(options, "--reward-option").items():
        name, dot, option = key.partition(".")
        if not dot or not option:
            raise HypersdError(f"--reward-option takes NAME.KEY=VALUE (e.g. aesthetic.head=head.safetensors), got {key!r}")
        if name not in settings:
            raise HypersdError(f"--reward-option {key}=... names a reward not in --rewards ({', '.join(names) or 'none'})")
        settings[name][option] = int(value) if value.isdigit() else value
    return settings


def load_rewards(settings: dict[str, dict], device="cpu") -> dict:
    """Each reward loaded by name; a missing weight fails in one line that says which flag to pass."""
    from hypersd.rewards import load_reward

    rewards = {}
    for name, kw in settings.items():
        kw = dict(kw)
        try:
            rewards[name] = load_reward(name, kw.pop("path", None), device=device, **kw)
        except HypersdError as e:
            raise HypersdError(f"{e} (on the command line: path= is --reward-path {name}=PATH, head= and "
                               f"processor= are --reward-option {name}.head=PATH)") from None
    return rewards


# -- FID ------------------------------------------------------------------------------------------
def make_fid(feature: "int | torch.nn.Module" = 2048):
    """torchmetrics' FID: an int is the Inception-v3 feature layer (torch-fidelity's network and
    weights); a module is any extractor mapping uint8 images [B, 3, H, W] to features [B, d]."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except (ImportError, RuntimeError) as e:
        raise HypersdError(f"cannot import torchmetrics' FID ({type(e).__name__}: {str(e)[:120]}); "
                           f"reinstall torchmetrics (and torch-fidelity with a torchvision matching torch)") from None
    if isinstance(feature, int) and feature not in FID_FEATURES:
        raise HypersdError(f"--fid-feature {feature} is not an Inception-v3 layer; choose one of {FID_FEATURES}")
    try:
        return FrechetInceptionDistance(feature=feature, normalize=False)
    except ModuleNotFoundError:
        raise HypersdError("FID's Inception-v3 needs torch-fidelity: pip install 'hypersd[fid]'") from None
    except (OSError, RuntimeError, ValueError) as e:  # most often: weights not cached and no network
        raise HypersdError(f"cannot load FID's Inception-v3 weights ({type(e).__name__}: {str(e)[:120]}); run once "
                           f"with network access so torch-fidelity caches them") from None


def fid_value(fid) -> float:
    """FID of a metric from ``make_fid`` after its updates: torchmetrics extracts and sums the
    features, hypersd's one Fréchet distance (``frechet``) compares them, as it does for every judge."""
    from hypersd.eval.frechet import frechet_from_moments

    def side(name: str):
        n = int(getattr(fid, f"{name}_features_num_samples"))
        mean = getattr(fid, f"{name}_features_sum").double().cpu() / n
        cov = (getattr(fid, f"{name}_features_cov_sum").double().cpu() - n * mean.outer(mean)) / (n - 1)
        return mean.numpy(), cov.numpy()

    return frechet_from_moments(*side("fake"), *side("real"))


# -- the evaluation ---------------------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: dict  # name -> {"mean", "std", "n"}; fid -> {"value", "n", "n_reference"}
    images: list[dict]  # per image: file, prompt and each reward's score
    settings: dict


def evaluate(files: list[Path], prompts: list[str] | None, rewards: dict, reference: list[Path] | None = None,
             fid_feature: "int | torch.nn.Module" = 2048, batch_size: int = 16, device="cpu",
             progress: bool = False, settings: dict | None = None, fid=None) -> EvalResult:
    """Every reward's score per image and its mean, and FID against ``reference``.

    All images are brought to the size of the first one (the model's resolution). ``fid``: a
    metric from ``make_fid`` made beforehand (else one is made from ``fid_feature``)."""
    import torch

    with torch.no_grad():
        return _evaluate(files, prompts, rewards, reference, fid_feature, batch_size, device, progress, settings,
                         fid)


def _evaluate(files, prompts, rewards, reference, fid_feature, batch_size, device, progress, settings,
              fid) -> EvalResult:
    import torch
    from tqdm.auto import tqdm

    if rewards and (prompts is None or len(prompts) != len(files)):
        raise HypersdError("rewards need one prompt per image; pass --prompts FILE")
    if batch_size < 1:
        raise HypersdError(f"--batch-size must be at least 1, got {batch_size}")
    if reference is not None:
        if len(files) < 2 or len(reference) < 2:
            raise HypersdError(f"FID needs at least 2 images on each side; got {len(files)} images and "
                               f"{len(reference)} reference images")
        fid = (fid if fid is not None else make_fid(fid_feature)).to(device)
    else:
        fid = None
    size = tuple(load_image(files[0]).shape[-2:])
    rows = [{"file": f.name, **({"prompt": prompts[i]} if prompts else {})} for i, f in enumerate(files)]
    steps = math.ceil(len(files) / batch_size) + (math.ceil(len(reference) / batch_size) if fid else 0)
    bar = tqdm(total=steps, desc="eval", disable=not progress)
    for start, images in batches(files, batch_size, size):
        images = images.to(device)
        for name, reward in rewards.items():
            scores = reward(to_unit(images), prompts[start:start + len(images)]).float().cpu()
            for row, s in zip(rows[start:], scores.tolist()):
                row[name] = s
        if fid is not None:
            fid.update(images, real=False)
        bar.update()
    if fid is not None:
        for _, images in batches(reference, batch_size, size):
            fid.update(images.to(device), real=True)
            bar.update()
    bar.close()
    metrics = {}
    for name in rewards:
        scores = torch.tensor([r[name] for r in rows], dtype=torch.float64)
        metrics[name] = {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 0.0,
                         "n": len(scores)}
    if fid is not None:
        metrics["fid"] = {"value": fid_value(fid), "n": len(files), "n_reference": len(reference)}
    info = {"size": list(size), **(settings or {})}
    if fid is not None:
        info["fid_feature"] = fid_feature if isinstance(fid_feature, int) else type(fid_feature).__name__
    return EvalResult(metrics, rows, info)


def report_markdown(result: EvalResult, title: str = "Image evaluation") -> str:
    note = ", ".join(f"{k}: {v}" for k, v in result.settings.items() if not isinstance(v, dict))
    lines = [f"## {title}", "", note, "", "| metric | value | std | images |", "|---|---|---|---|"]
    for name, m in result.metrics.items():
        if name == "fid":
            lines.append(f"| FID (vs {m['n_reference']} reference images) | {m['value']:.3f} | – | {m['n']} |")
        else:
            lines.append(f"| {name} | {m['mean']:.4f} | {m['std']:.4f} | {m['n']} |")
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, out_dir: str | Path, force: bool = False, name: str = "image_eval"):
    from hypersd.outputs import check_writable, write_text

    js, md = Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"
    for p in (js, md):
        check_writable(p, force)
    write_text(js, json.dumps({"settings": result.settings, "metrics": result.metrics, "images": result.images},
                              indent=2))
    write_text(md, report_markdown(result))
    return js, md


# -- the command --------------------------------------------------------------------------------------
def add_eval_args(e) -> None:
    """The real-image options of ``hypersd eval`` (the digits table keeps its own)."""
    from hypersd.cli.generate import add_sampling_args

    e.add_argument("--images", default=None, help="evaluate this folder of images (real-image mode)")
    e.add_argument("--model", default=None, help="generate from this model first, then evaluate (real-image mode)")
    e.add_argument("--prompts", default=None, help="one prompt per line: per image in file-name order (--images; "
                                                   "default: each PNG's own prompt) or to generate from (--model)")
    e.add_argument("--reference", default=None, help="a folder of real images: adds FID against them")
    e.add_argument("--rewards", default=",".join(DEFAULT_REWARDS),
                   help=f"comma-separated, from {', '.join(IMAGE_REWARDS)}; 'none' for FID only (default: clip)")
    e.add_argument("--reward-path", action="append", default=[], metavar="NAME=PATH",
                   help="a reward's model folder or hub id (repeatable)")
    e.add_argument("--reward-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a reward option, e.g. aesthetic.head=FILE.safetensors, imagereward.head=... (repeatable)")
    e.add_argument("--fid-feature", type=int, default=2048, choices=FID_FEATURES, help="Inception-v3 feature layer")
    add_sampling_args(e, shared=("--steps", "--guidance"))


def real_only_flags(a) -> list[str]:
    return [flag for flag, value in (("--prompts", a.prompts), ("--reference", a.reference), ("--lora", a.lora),
                                     ("--reward-path", a.reward_path), ("--reward-option", a.reward_option))
            if value]


def cmd_image_eval(a) -> None:
    """``hypersd eval`` with --images or --model."""
    from hypersd.cli.generate import generator_from_args
    from hypersd.device import resolve_device
    from hypersd.inference.jobs import plan_jobs, read_prompts, run_jobs
    from hypersd.outputs import check_writable

    if bool(a.images) == bool(a.model):
        raise HypersdError("pass --images DIR (evaluate a folder) or --model M (generate, then evaluate), not both")
    out_dir = Path(a.out_dir)
    for name in ("image_eval.json", "image_eval.md"):
        check_writable(out_dir / name, a.force)
    names = [] if a.rewards.strip() == "none" else [n.strip() for n in a.rewards.split(",") if n.strip()]
    settings = reward_settings(names, a.reward_path, a.reward_option)
    if a.model and not a.prompts:
        raise HypersdError("eval --model needs --prompts FILE, one prompt per line")
    if a.model and a.steps is not None and len(a.steps) != 1:
        raise HypersdError(f"eval --model takes one --steps value, got {','.join(map(str, a.steps))}")
    if a.images and a.lora:
        raise HypersdError("--lora is for generating: use it with --model, or evaluate the images as they are")
    reference = list_images(a.reference, "--reference") if a.reference else None
    info = {"rewards": settings, **({"reference": a.reference} if reference else {})}
    # inputs are read before any model loads, so that a bad one fails in a second
    if a.images:
        files = list_images(a.images)
        prompts = image_prompts(files, a.prompts) if names else None
        info["images"] = a.images
    else:
        prompts = read_prompts(a.prompts)
        jobs = plan_jobs(prompts, out_dir / "images", 1, a.seed, a.force)
    device = resolve_device(a.device)
    # every judge before any generation: a missing weight fails in seconds, not after 5,000 images
    rewards = load_rewards(settings, device)
    fid = make_fid(a.fid_feature) if reference else None
    if a.model:
        gen = generator_from_args(a, steps=a.steps[0] if a.steps else None, n_images=len(jobs))
        files = run_jobs(gen, jobs, a.batch_size)
        info["generated"] = {**asdict(gen.plan), "path": gen.path_note}
        info["images"] = str(out_dir / "images")
    result = evaluate(files, prompts, rewards, reference, a.fid_feature, a.batch_size, device, progress=True,
                      settings=info, fid=fid)
    js, md = write_report(result, out_dir, a.force)
    print(md.read_text())
    print(f"wrote {js} and {md}")
