"""LoRA on the teacher's UNet: adapters, their algebra, hypersd's files and the other tools' layouts.

- ``adapters``: the named adapters on the one UNet (STUDENT, EMA, ...), switching, their weights
- ``algebra``: an exact merge of two LoRAs, and the nearest LoRA of a lower rank
- ``files``: hypersd's own LoRA files (save, read, load)
- ``layouts``: diffusers' and kohya's layouts, read and written; loading or fusing any of them
- ``transformer_layouts``: kohya's layout for SD3's and FLUX's transformers (original names, fused qkv)
- ``cli``: the ``hypersd lora`` command

The rest of hypersd calls these as ``lora.X`` (``lora.STUDENT``, ``lora.adapter``, ``lora.save_lora``).
They are looked up on first use: building the command line (``lora.cli``) must import no torch.
"""

from __future__ import annotations

import importlib

_FROM = {
    "adapters": ("STUDENT", "EMA", "FEEDBACK", "FAKE", "AVERAGE", "TARGET_PRESETS", "preset_for", "lora_config", "has_adapters",
                 "add_lora", "remove_lora", "spec", "ensure_lora", "activate", "adapter_params", "get_state",
                 "set_state", "check_state", "active", "adapters_disabled", "adapter", "fused", "_tuner_layers"),
    "algebra": ("merge_states", "compress_state"),
    "files": ("save_lora", "save_state", "read_lora", "load_lora"),
}
_MODULE_OF = {name: module for module, names in _FROM.items() for name in names}
__all__ = [name for name in _MODULE_OF if not name.startswith("_")]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # found once; later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
