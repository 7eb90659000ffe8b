"""Reward models for feedback learning (HYPERSD.md §2), pluggable by name.

Every reward is a frozen ``Reward`` (an nn.Module): ``reward(images, prompts) -> Tensor[B]``,
images [B, 3, H, W] in [-1, 1] at any size (digits: [B, 1, 8, 8]), one prompt per image,
differentiable in the images, higher is better::

    reward = load_reward("aesthetic", head="aesthetic_head.safetensors").to("cuda")
    loss = torch.relu(alpha - reward(x0, prompts)).mean()

Names: digits, clip, aesthetic, pickscore, hpsv2, imagereward. ``REWARDS`` maps each name to a
factory ``(path=None, **kw) -> Reward``; add an entry to plug in another reward. Factories import
their module when called, so ``digits`` never imports transformers.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from hypersd.errors import HypersdError
from hypersd.rewards.base import Reward, check_scores


def _lazy(module: str, cls: str) -> Callable[..., Reward]:
    def factory(path: str | None = None, **kw) -> Reward:
        load = getattr(importlib.import_module(f"{__name__}.{module}"), cls).load
        # a misspelt option from a config must fail by name, not be ignored or end in a TypeError
        known = [p for p in inspect.signature(load).parameters if p != "path"]
        unknown = sorted(set(kw) - set(known))
        if unknown:
            takes = f"it takes {', '.join(known)}" if known else "it takes only path"
            raise HypersdError(f"{module} reward has no option {', '.join(unknown)}; {takes}")
        return load(path, **kw)

    factory.__name__ = f"load_{module}"
    return factory


REWARDS: dict[str, Callable[..., Reward]] = {
    "digits": _lazy("digits", "DigitsReward"),
    "clip": _lazy("clip", "ClipScore"),
    "aesthetic": _lazy("aesthetic", "AestheticScore"),
    "pickscore": _lazy("pickscore", "PickScore"),
    "hpsv2": _lazy("hpsv2", "HPSv2"),
    "imagereward": _lazy("imagereward", "ImageReward"),
}


def load_reward(name: str, path: str | None = None, device=None, dtype=None, **kw) -> Reward:
    """A reward by name. ``path``: its weights (a file for digits; a transformers folder or hub id
    for the others; defaults where a public model exists). Extra keywords go to the reward:
    ``head=`` (aesthetic, imagereward), ``processor=`` (CLIP family, imagereward)."""
    if name not in REWARDS:
        raise HypersdError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    reward = REWARDS[name](path, **kw)
    if device is not None or dtype is not None:
        reward.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    return reward


__all__ = ["REWARDS", "Reward", "check_scores", "load_reward"]
