"""The one check that a name given for a model, a VAE or a reward's weights is a Hugging Face hub id."""

from __future__ import annotations

import re
from pathlib import Path

from hypersd.errors import HypersdError

# owner/name: one slash, each part word characters, dots and dashes, not starting with a dot or a dash
HUB_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")


def is_hub_id(text) -> bool:
    return bool(HUB_ID.fullmatch(str(text)))


def check_hub_id(source, what: str, fix: str) -> str:
    """``source`` as a hub id, where a local folder was not found under that name.

    Refused in one line, ``{what} {source} <problem>; {fix}``: a file that is there (hub ids and
    folders are what is loaded), a path that is not there, or a name that is no ``owner/name``."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        problem = "is a file, not a folder" if not path.is_dir() else "is a local folder, not a hub id"
    elif _looks_like_a_path(text):
        problem = "not found"
    elif not is_hub_id(text):
        problem = "is neither a folder here nor a hub id of the form owner/name"
    else:
        return text
    raise HypersdError(f"{what} {text} {problem}; {fix}")


def _looks_like_a_path(text: str) -> bool:
    """Written as a path (absolute, from home or here, or with more than one slash), not as an id."""
    return text.startswith(("/", "~", "./", "../", "\\")) or text.count("/") > 1 or "\\" in text
