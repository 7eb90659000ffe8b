"""The frozen base sharded over the processes with FSDP2 (``run.shard_base``, docs/MEMORY.md "Many GPUs").

Each of the network's blocks (those its class names unsplittable, ``_no_split_modules``) and the
rest of it hold 1/N of their frozen weights per process and all-gather them for each call. The LoRA
weights stay out of the shards: plain tensors on every process, averaged by hypersd's own data
parallel and saved as they are, and adapters added later (a stage's EMA target, the feedback LoRA,
DMD's fake score, a merge's rebuilt student) are switched per layer as on an unsharded base
(tests/nets/test_fsdp.py)."""

from __future__ import annotations

import torch

from hypersd.errors import HypersdError


def check_shardable(recipe, world: int) -> None:
    """Refuse, before a model loads, what a sharded base cannot run. Every stage kind runs: each
    process makes the same network calls (each all-gathers), its step counts and branches drawn
    from the stream they share (``runtime.run_streams``), its skipped steps decided together, and
    TSCD's low-noise solve (``solve_below``) padded to the most calls any process needs."""
    if world < 2:
        raise HypersdError("shard_base shards the frozen base over the processes of an accelerate launch, and this "
                           "is one process; launch with accelerate launch --multi_gpu --num_processes N, or set "
                           "shard_base: false")
    clashes = {"quantize_base": recipe.run.quantize_base != "none", "fp8_teacher": recipe.run.fp8_teacher,
               "compile": recipe.run.compile}
    for key, on in clashes.items():
        if on:
            raise HypersdError(f"shard_base does not combine with {key} (not supported on a sharded base); "
                               f"set {key} off, or shard_base: false")


def shard_base(unet: torch.nn.Module, device: torch.device, world: int) -> int:
    """Shard ``unet``'s frozen weights over ``world`` processes; its LoRA weights left whole. Returns the blocks sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(unet, "_no_split_modules", None) or ())
    # children before parents: FSDP2 groups a module's weights less those of its sharded submodules
    blocks = [m for m in reversed(list(unet.modules())) if type(m).__name__ in names]
    if not blocks:
        raise HypersdError(f"{type(unet).__name__} names no blocks to shard (_no_split_modules); set shard_base: false")
    mesh = init_device_mesh(device.type, (world,))
    ignored = {p for n, p in unet.named_parameters() if "lora_" in n}
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(unet, mesh=mesh, ignored_params=ignored)
    return len(blocks)


def is_sharded(unet: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unet, FSDPModule)


def shard_teacher(teacher, device: torch.device, world: int) -> dict:
    """The teacher's denoiser sharded onto ``device`` (loaded on the CPU: no process holds all of it
    there), its LoRA weights and every other part of it (text encoders, VAE) moved there whole.
    Returns the blocks sharded and the share of the frozen weights this process holds."""
    n = shard_base(teacher.unet, device, world)
    with torch.no_grad():  # FSDP2 moves what it shards; the LoRA weights it leaves out stay where they were
        for name, p in teacher.unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(device)
    for part in vars(teacher).values():
        if isinstance(part, torch.nn.Module) and part is not teacher.unet:
            part.to(device)
    return {"blocks": n, "processes": world, "held": round(held_share(teacher.unet), 4)}


def held_share(unet: torch.nn.Module) -> float:
    """The share of ``unet``'s frozen weights this process holds (1/N of them sharded over N)."""
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen)
    return local / max(1, sum(p.numel() for p in frozen))


def reshard(unet: torch.nn.Module) -> None:
    """After calls without a backward (sampling): FSDP2 keeps the root's weights gathered after
    its forward, and reading process 0's state dict then reshards them there alone, so the next
    call would all-gather on process 0 but not on the others. Resharded on every process alike."""
    if is_sharded(unet):
        unet.reshard()


def unshard_root(unet: torch.nn.Module) -> None:
    """Gather the weights outside the blocks (embeddings, final norm) for code that calls the
    network's parts rather than its forward (the discriminator's feature read): the blocks, FSDP
    modules of their own, gather themselves. Left gathered until ``reshard`` (the root's own
    post-backward, the next sample grid or checkpoint): every process does the same."""
    if is_sharded(unet):
        unet.unshard()
