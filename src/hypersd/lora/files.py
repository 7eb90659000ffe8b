"""hypersd's LoRA files: safetensors in peft's key naming, the adapter's shape in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict

from hypersd.errors import HypersdError
from hypersd.lora.adapters import (
    STUDENT,
    add_lora,
    check_state,
    get_state,
    lora_config,
    remove_lora,
    spec,
)


def save_lora(path: str | Path, unet, meta: dict, name: str = STUDENT) -> Path:
    """Adapter ``name`` as a LoRA file; its shape (rank, alpha, targets) goes in the metadata."""
    return save_state(path, get_state(unet, name), {**meta, **spec(unet, name)})


def save_state(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    from hypersd.outputs import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"hypersd": json.dumps(meta)})
    return Path(path)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    from hypersd.outputs import read_metadata

    path = Path(path)
    if not path.is_file():
        raise HypersdError(f"LoRA file {path} not found")
    meta = read_metadata(path, "LoRA")
    try:
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise HypersdError(f"{path} is not a readable safetensors LoRA file ({e})") from None


def load_lora(unet, path: str | Path, name: str = STUDENT) -> dict:
    """Attach a saved LoRA as adapter ``name`` and make it active; returns its metadata."""
    state, meta = read_lora(path)
    if "rank" not in meta:
        raise HypersdError(f"{path} has no hypersd LoRA metadata (rank, targets); was it written by hypersd?")
    remove_lora(unet, name)
    add_lora(unet, lora_config(meta["rank"], meta["alpha"], meta["targets"]), name)
    check_state(unet, state, name, source=f"LoRA {path}")
    set_peft_model_state_dict(unet, state, adapter_name=name)
    unet.set_adapter(name)
    return meta
