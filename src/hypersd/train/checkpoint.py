"""Training checkpoints: written whole or not at all, rotated, resumable.

A checkpoint is a folder ``step-NNNNNNN`` of safetensors files (weights), one ``optim.pt`` of
optimizer states (our own file; read back with ``weights_only=True``) and ``state.json``. It is
written under a temporary name, synced and renamed into place, so a kill at any moment leaves
either the previous checkpoints or the new one, never a torn one; a full disk leaves the previous
ones. A checkpoint damaged anyway (a truncated file) is set aside on resume and the one before it
is used (``load_latest``).

Everything stateful besides the adapters (the optimizers, the GradScalers, the random streams, a
stage's discriminator heads) follows one protocol, ``state_dict()`` / ``load_state_dict()``, and is
registered by name in a ``StateRegistry``: a checkpoint holds what the registry holds, and a resume
refuses a checkpoint that lacks a registered piece. A piece whose state is a flat dict of tensors is
a safetensors file of its name; any other state is an entry of ``optim.pt`` under its name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from hypersd.errors import HypersdError
from hypersd.outputs import fsync_dir, fsync_tree, is_disk_full

PREFIX = "step-"
TMP, OLD, DAMAGED = ".tmp-", ".old-", "damaged-"
FORMAT = 2  # state.json's "format"; 1 (none written): before the registry, when scalers could be absent
ADAPTER = "lora-"  # the adapters' files: lora-<name>.safetensors (not registry pieces)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def is_tensor_state(state) -> bool:
    """Whether a state is a flat, non-empty dict of tensors: a safetensors file holds it."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def split_states(states: dict[str, dict]) -> tuple[dict[str, dict], dict]:
    """Pieces' states as a checkpoint stores them: (safetensors files by name, optim.pt's entries)."""
    tensors = {n: st for n, st in states.items() if is_tensor_state(st)}
    return tensors, {n: st for n, st in states.items() if n not in tensors}


def load_pieces(pieces: dict[str, Stateful], saved: dict, source: str) -> None:
    """Each piece's state from ``saved`` (a checkpoint's files and optim.pt entries by name); every
    piece missing is named at once, before any is loaded."""
    missing = sorted(set(pieces) - set(saved))
    if missing:
        raise HypersdError(
            f"{source} holds no {', '.join(map(repr, missing))}, which this run needs to resume; it was written "
            f"by a hypersd that did not save that, or a file of it was deleted. Resume it with the hypersd that "
            f"wrote it, or start over with --force (or a new --out)")
    for name, piece in pieces.items():
        piece.load_state_dict(saved[name])


class StateRegistry:
    """Every stateful piece of a run, by name: what a checkpoint holds and what a resume restores.

    A piece is registered where it is made (the trainer's random streams and scalers at the start,
    a stage's optimizer and heads while the stage runs), so no checkpoint can forget one."""

    def __init__(self):
        self.pieces: dict[str, Stateful] = {}

    def register(self, name: str, piece: Stateful) -> None:
        if name in self.pieces or name.startswith(ADAPTER):
            raise ValueError(f"checkpoint piece {name!r} is already taken")
        self.pieces[name] = piece

    def unregister(self, names) -> None:
        for name in names:
            del self.pieces[name]

    @contextlib.contextmanager
    def scope(self, pieces: dict[str, Stateful]):
        """``pieces`` registered for the duration (a stage's, while it runs)."""
        for name, piece in pieces.items():
            self.register(name, piece)
        try:
            yield
        finally:
            self.unregister(pieces)

    def state_dict(self) -> dict[str, dict]:
        return {name: piece.state_dict() for name, piece in self.pieces.items()}

    def load_state_dict(self, saved: dict, source: str = "the checkpoint", names=None) -> None:
        """Restore the registered pieces (only ``names`` of them, where given) from ``saved``."""
        pieces = self.pieces if names is None else {n: self.pieces[n] for n in names}
        load_pieces(pieces, saved, source)


def saved_pieces(tensors: dict, optim: dict) -> dict:
    """A checkpoint's pieces by name, wherever each is stored."""
    return {**optim, **{n: t for n, t in tensors.items() if not n.startswith(ADAPTER)}}


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    optim: dict, state: dict, keep: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tidy(root)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f"{TMP}{PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, tensors, optim, state)
    except Exception as e:  # a full disk, mostly: what was there before stays, and says so
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(root, final, e) from None
    if final.exists():  # the same step again (a resumed run re-saving): replace it whole
        old = root / f"{OLD}{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:  # only once the new one is in place
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write(tmp: Path, tensors: dict, optim: dict, state: dict) -> None:
    tmp.mkdir()
    for name, d in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in d.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(optim, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    fsync_tree(tmp)  # before the rename: a power loss must not leave a named but empty checkpoint


def _write_error(root: Path, final: Path, e: Exception) -> HypersdError:
    before = list_checkpoints(root)
    kept = (f"the previous checkpoint {before[-1]} is intact and --resume continues from it" if before
            else "no earlier checkpoint exists")
    full = is_disk_full(e)
    what = "no space left on the device" if full else f"{type(e).__name__}: {e}"
    fix = f"free space in {root} and run again with --resume" if full else "fix that and run again with --resume"
    return HypersdError(f"checkpoint {final} could not be written ({what}); nothing of it was kept, {kept}; {fix}")


def tidy(root: str | Path) -> None:
    """Clear what a killed save left in ``root``: half-written folders go; a checkpoint moved aside to
    be replaced, whose replacement never landed, comes back."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(TMP + PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(OLD + PREFIX):
            name = p.name[len(OLD):].rsplit("-", 1)[0]
            if (root / name).exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(root / name)


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    path = Path(path)
    try:
        return _read(path)
    except Exception as e:  # a damaged folder: say which and how to go on
        raise HypersdError(f"checkpoint {path} cannot be read ({_why(e)}); "
                           f"delete that folder to resume from the one before it") from None


def _read(path: Path):
    state = json.loads((path / "state.json").read_text())
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    optim = torch.load(path / "optim.pt", weights_only=True)
    if state.get("format", 1) < 2:  # written before the registry: fp16 scalers were not always saved
        optim.setdefault("scalers", {})
    missing = sorted({"rng", *(f"lora-{n}" for n in state["adapters"])} - tensors.keys())
    if missing:
        raise FileNotFoundError(f"no {', '.join(m + '.safetensors' for m in missing)}")
    return tensors, optim, state


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def load_latest(root: str | Path, warn, writer: bool = True) -> tuple[Path, tuple] | None:
    """The newest readable checkpoint under ``root`` and its contents; None when there is none.

    One that cannot be read (a truncated file, bad JSON) is moved aside to ``damaged-step-N``, kept for
    a look but out of the rotation (the resumed run writes that step anew), and the one before it is
    tried; ``warn`` is told of each. Only the ``writer`` (process 0 of a parallel run) moves folders:
    the others read what it leaves, and fall back the same way."""
    if writer:
        tidy(root)
    ckpts = list_checkpoints(root)
    for i, path in enumerate(reversed(ckpts)):
        try:
            return path, _read(path)
        except Exception as e:  # safetensors, torch and json each raise their own types
            if not writer:
                continue
            older = ckpts[-2 - i] if i + 1 < len(ckpts) else None
            aside = _set_aside(path)
            warn(f"checkpoint {path} cannot be read ({_why(e)}); moved it to {aside.name}; "
                 + (f"resuming from {older} instead" if older else "no checkpoint is left to resume from"))
    if ckpts:
        raise HypersdError(f"no checkpoint in {root} can be read (each is now a damaged-step-* folder there); "
                           f"start over with --force, or choose a new --out")
    return None


def _set_aside(path: Path) -> Path:
    target, n = path.with_name(DAMAGED + path.name), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED}{path.name}-{n}")
    path.rename(target)
    return target
