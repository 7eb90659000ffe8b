"""What every reward shares: the call contract, the output check, and where weights come from."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hypersd.errors import HypersdError
from hypersd.hub import check_hub_id


def check_scores(scores, batch: int, name: str = "reward") -> torch.Tensor:
    """``scores`` if it is one finite float per image, else a HypersdError naming the reward.

    A NaN reward poisons every LoRA weight in one optimiser step, and a [B, 1] reward silently
    broadcasts against [B] weights; both are cheaper to stop here than to debug in a loss curve.
    """
    if not isinstance(scores, torch.Tensor):
        raise HypersdError(f"{name} reward returned {type(scores).__name__}, not a tensor of {batch} scores")
    if tuple(scores.shape) != (batch,):
        raise HypersdError(f"{name} reward returned shape {tuple(scores.shape)}; "
                           f"expected ({batch},), one score per image")
    if not torch.isfinite(scores.detach()).all():
        bad = int((~torch.isfinite(scores.detach())).sum())
        raise HypersdError(f"{name} reward returned {bad} non-finite score(s) (NaN or inf) for {batch} images")
    return scores


class Reward(nn.Module):
    """A frozen, differentiable judge: ``reward(images, prompts) -> Tensor[B]``.

    ``images`` are [B, C, H, W] in [-1, 1] (C = 3 unless a subclass says otherwise), ``prompts`` a
    list of B strings. Higher is better. Subclasses implement ``score``; the call validates the
    inputs and checks the output, so every reward fails the same way.
    """

    name = "reward"
    channels = 3

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise HypersdError(f"{self.name} reward takes images [B, {self.channels}, H, W]; got {tuple(images.shape)}")
        if len(prompts) != len(images):
            raise HypersdError(f"{self.name} reward got {len(images)} images but {len(prompts)} prompts")
        return check_scores(self.score(images, list(prompts)), len(images), self.name)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True):
        # A judge's dropout must never be on: a trainer calling .train() on everything would
        # otherwise make the reward random.
        return super().train(False)


def one_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def model_source(path: str | None, reward: str, what: str) -> str:
    """``path`` as given if it is an existing local folder or looks like a hub id; else one line."""
    if not path:
        raise HypersdError(f"{reward} reward needs {what}: pass path=FOLDER_OR_HUB_ID")
    folder = Path(str(path)).expanduser()
    if folder.is_dir():
        return str(folder)
    return check_hub_id(path, f"{reward} reward:", f"pass path= a local folder with {what} or a hub id")


def load_part(load, source: str, reward: str, what: str, fix: str = "pass path= a local folder"):
    """``load(source)`` with its failure turned into one line that says what to pass."""
    try:
        return load(source)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        if Path(source).is_dir():
            raise HypersdError(f"{reward} reward: cannot load {what} from {source} ({one_line(e)}); {fix}") from None
        raise HypersdError(
            f"{reward} reward: {source!r} is not a local folder, and {what} is neither in the hub cache nor "
            f"downloadable ({type(e).__name__}); download it once with network access, or {fix}"
        ) from None


def load_model(model_cls, source: str, reward: str, what: str, used: tuple[str, ...] = ("",)):
    """``model_cls.from_pretrained(source)``, refusing a checkpoint that lacks weights we use.

    transformers fills missing weights with random ones and only logs it; a reward with a random
    layer still returns plausible numbers, so here it is an error. ``used``: the key prefixes the
    reward runs (ImageReward, for one, never runs BLIP's projections or ITM head).
    """
    model, info = load_part(lambda s: model_cls.from_pretrained(s, output_loading_info=True), source, reward, what)
    missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(used))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HypersdError(f"{reward} reward: {what} in {source} lacks weights ({missing[0]}{more}); "
                           f"pass path= a complete checkpoint")
    return model
