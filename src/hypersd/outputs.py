"""Writing results safely: never clobber what a user has, never leave half a file."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from hypersd.errors import HypersdError

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
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:
        if is_disk_full(e):
            raise HypersdError(f"no space left on the device while writing {path}; "
                               f"{'the file there is unchanged' if path.exists() else 'nothing was written'}: "
                               f"free some space and run the command again") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_file(path: str | Path) -> None:
    """Push a written file to the disk: a rename that a power loss keeps must not name an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened, as on Windows)."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder``, then the folders themselves."""
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_file(p)
    for d in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_dir(d)


def is_disk_full(e: BaseException) -> bool:
    """A full disk or quota, whichever layer raised it: safetensors and torch report the OS error in
    their own exception types."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


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
