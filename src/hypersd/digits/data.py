"""scikit-learn's bundled digits (1,797 8x8 images), a fixed split, and their prompts."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def prompt_for(label: int) -> str:
    return f"a handwritten digit {NAMES[int(label)]}"


def prompts_for(labels) -> list[str]:
    return [prompt_for(int(y)) for y in labels]


@lru_cache(maxsize=None)
def _split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # Pixels are 0..16; pixel/8 - 1 puts them in [-1, 1].
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [n,1,8,8] in [-1,1], labels [n]) of the "train" or "test" split."""
    x_tr, x_te, y_tr, y_te = _split()
    if split == "train":
        return torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    if split == "test":
        return torch.from_numpy(x_te), torch.from_numpy(y_te)
    raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")


def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... : the prompts every evaluation uses, equal per class."""
    return torch.arange(n) % 10
