"""Training checkpoints: written whole or not at all, rotated, resumable.

A checkpoint is a folder ``step-NNNNNNN`` of safetensors files (weights), one ``optim.pt`` of
optimizer states (our own file; read back with ``weights_only=True``) and ``state.json``. It is
written under a temporary name and renamed into place, so a kill at any moment leaves either
the previous checkpoints or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import HypersdError

PREFIX = "step-"


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    optim: dict, state: dict, keep: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, d in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in d.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(optim, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():  # the same step again (a resumed run re-saving): replace it whole
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
        optim = torch.load(path / "optim.pt", weights_only=True)
    except Exception as e:  # a damaged folder: say which and how to go on
        raise HypersdError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                           f"delete that folder to resume from the one before it") from None
    return tensors, optim, state
