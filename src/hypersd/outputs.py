"""Writing results safely: never clobber what a user has, never leave half a file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import HypersdError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_writable(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite an existing file unless ``force``; create the parent folder."""
    path = Path(path)
    if path.exists() and not force:
        raise HypersdError(f"{path} already exists; pass --force to overwrite it, or choose another --out")
    if path.is_dir():
        raise HypersdError(f"{path} is a folder; --out takes a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    A crash or kill mid-write leaves the old file (or none) in place, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # some writers create 0600 files; follow the umask
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def read_metadata(path: str | Path, what: str) -> dict:
    """The hypersd metadata (a JSON object) of a safetensors file; {} when it has none."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("hypersd", "{}")) or {}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise HypersdError(f"{path} is not a readable safetensors {what} file ({e})") from None
