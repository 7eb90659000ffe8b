"""The digits world's two judges: a reward model and a held-out evaluator.

Two classifiers of different architecture, both trained on the train split. The reward model
(an MLP on pixels) may be used in training (feedback learning); the evaluator (a small CNN) never
is: it only scores samples, and its penultimate features define the Fréchet distance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hypersd.digits import ASSETS, data
from hypersd.errors import HypersdError


class RewardMLP(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EvaluatorCNN(nn.Module):
    FEATURES = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 16, self.FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(self.FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS = {"reward": RewardMLP, "evaluator": EvaluatorCNN}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One-pixel shifts and a little noise, so judges do not fail on near-misses of the real data."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_judge(name: str, epochs: int = 60, seed: int = 0, progress: bool = True) -> tuple[nn.Module, float]:
    """Train one judge on the train split; returns it and its test-split accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MODELS[name]()
    x, y = data.load("train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * ((len(x) + 63) // 64))
    for _ in tqdm(range(epochs), desc=f"judge:{name}", disable=not progress):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(_augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    x_te, y_te = data.load("test")
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return model, acc


def save_judge(model: nn.Module, name: str, path: str | Path, test_acc: float) -> None:
    from hypersd.outputs import atomic_path

    meta = {"kind": f"digits-{name}", "test_acc": test_acc}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"hypersd": json.dumps(meta)})


def load_judge(name: str, path: str | Path | None = None) -> nn.Module:
    path = Path(path) if path else ASSETS / f"{name}.safetensors"
    if not path.is_file():
        raise HypersdError(f"judge file {path} not found; train it with 'hypersd judges train'")
    model = MODELS[name]()
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise HypersdError(f"{path} is not a digits {name} judge: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


class Judges:
    """The reward model and the evaluator, loaded together."""

    def __init__(self, reward: nn.Module | None = None, evaluator: nn.Module | None = None):
        self.reward_model = reward or load_judge("reward")
        self.evaluator = evaluator or load_judge("evaluator")

    def reward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Differentiable reward: log-probability the reward model gives the prompted digit."""
        logp = self.reward_model(images).log_softmax(-1)
        return logp.gather(1, labels.view(-1, 1).to(logp.device)).squeeze(1)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(evaluator features for the Fréchet distance, predicted digit)."""
        feats = self.evaluator.features(images)
        return feats, self.evaluator.head(feats).argmax(1)
