"""The MLP head shared by the LAION aesthetic predictor v2 and ImageReward.

Both use the same five linear layers with dropout between the first four and no activation
(the ReLUs are commented out in both originals, so the head is an affine map; it is kept as
five layers so the public checkpoints load key for key). Weights are read from safetensors only:
a .pth is a pickle, and unpickling a downloaded file runs its code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hypersd.errors import HypersdError
from hypersd.rewards.base import one_line

HIDDEN = (1024, 128, 64, 16)
# Where the Linear layers sit in the public nn.Sequential: dropouts occupy 1, 3, 5.
LINEAR_INDICES = (0, 2, 4, 6, 7)


class MLPHead(nn.Module):
    def __init__(self, in_features: int, dropout=(0.2, 0.2, 0.1)):
        super().__init__()
        d = [in_features, *HIDDEN]
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(dropout[0]),
            nn.Linear(d[1], d[2]), nn.Dropout(dropout[1]),
            nn.Linear(d[2], d[3]), nn.Dropout(dropout[2]),
            nn.Linear(d[3], d[4]), nn.Linear(d[4], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float features in, float scores out, whatever dtype the head was cast to
        return self.layers(x.to(self.layers[0].weight.dtype)).squeeze(-1).float()


def convert_hint(reward: str, original: str, prefix: str = "") -> str:
    """The one-line command that turns the public .pth into the safetensors we read."""
    pick = f"{{k[{len(prefix)}:]: v for k, v in sd.items() if k.startswith('{prefix}')}}" if prefix else "sd"
    return (
        f"convert {original} once with: python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('IN.pth', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"save_file({pick}, 'OUT.safetensors')\""
    )


def head_file(path, reward: str, original: str, prefix: str = "") -> Path:
    """``path`` checked to be a .safetensors file; called before any big model loads."""
    hint = convert_hint(reward, original, prefix)
    if path is None:
        raise HypersdError(f"{reward} reward needs its MLP head: pass head=PATH to a .safetensors; {hint}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise HypersdError(f"{reward} reward: head file {path} not found; pass head=PATH to a .safetensors; {hint}")
    if path.suffix.lower() != ".safetensors":
        raise HypersdError(f"{reward} reward: {path.name} is not a .safetensors file "
                           f"(pickles are never loaded); {hint}")
    return path


def load_head(path, reward: str, original: str, in_features: int, prefix: str = "") -> MLPHead:
    """An MLPHead from ``path`` (.safetensors), keys ``layers.N.*`` or ``{prefix}layers.N.*``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = head_file(path, reward, original, prefix)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise HypersdError(f"{reward} reward: cannot read {path}: {one_line(e)}") from None
    # Accept a file holding only the head, or the head under its original prefix among other keys.
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    head = MLPHead(in_features)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        what = (f"missing {', '.join(missing[:3])}" if missing else
                f"{wrong[0]} is {list(found[wrong[0]])}, expected {list(expected[wrong[0]])}" if wrong else
                f"unexpected keys {', '.join(sorted(set(found) - set(expected))[:3])}")
        raise HypersdError(f"{path} is not a {reward} head for {in_features}-d features ({what}); "
                           f"{convert_hint(reward, original, prefix)}")
    head.load_state_dict(sd)
    return head
