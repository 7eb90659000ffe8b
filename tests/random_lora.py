"""A saved LoRA whose weights are random rather than trained: large enough that sampling with it
differs visibly from the base, so a test sees whether a loader applied it."""

import torch

from hypersd import lora


def save_random_lora(net, path, meta: dict, targets: str = "all", std: float = 0.3, seed: int = 1):
    """Attach a rank-4, alpha-8 student LoRA on ``targets`` to ``net``, draw its weights from
    N(0, std²) with ``seed``, and save it with ``meta`` to ``path``; returns ``path``."""
    lora.add_lora(net, lora.lora_config(4, 8, targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_params(net, lora.STUDENT):
            p.normal_(0, std)
    lora.save_lora(path, net, meta)
    return path
