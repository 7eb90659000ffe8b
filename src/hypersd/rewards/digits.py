"""The embedded world's reward: the digits reward judge's log-probability of the prompted digit.

Images are [B, 1, 8, 8] in [-1, 1]; the digit is read from the prompt ("a handwritten digit
seven"), the same prompts the digits teacher is conditioned on.
"""

from __future__ import annotations

import re

import torch

from hypersd.digits.data import NAMES
from hypersd.errors import HypersdError
from hypersd.rewards.base import Reward

_WORDS = re.compile(r"[a-z]+")


def label_of(prompt: str) -> int:
    """The one digit name in ``prompt``; prompts naming none, or two different ones, are refused."""
    found = {NAMES.index(w) for w in _WORDS.findall(prompt.lower()) if w in NAMES}
    if len(found) != 1:
        problem = "names no digit" if not found else "names several digits"
        raise HypersdError(f"digits reward: prompt {prompt!r} {problem}; use prompts like 'a handwritten digit seven'")
    return found.pop()


class DigitsReward(Reward):
    name = "digits"
    channels = 1

    def __init__(self, judges):
        super().__init__()
        self.judges = judges
        # registered so that .to(device) moves it; the evaluator is never used here
        self.model = judges.reward_model
        self.eval()

    @classmethod
    def load(cls, path: str | None = None) -> "DigitsReward":
        """``path``: a reward judge .safetensors (default: the one shipped with hypersd)."""
        from hypersd.digits.judges import Judges, load_judge

        return cls(Judges(reward=load_judge("reward", path)))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (8, 8):
            raise HypersdError(f"digits reward takes 8x8 images; got {tuple(images.shape[-2:])}")
        labels = torch.tensor([label_of(p) for p in prompts], device=images.device)
        return self.judges.reward(images, labels)
