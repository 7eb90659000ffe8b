"""Speed and memory options for the UNet that every stage shares.

Each option changes how fast a step runs or how much memory it takes, never what it computes
(up to float rounding): the tests compare each against the plain path.
"""

from __future__ import annotations

import torch

from hypersd.errors import HypersdError

# The UNet's repeated blocks. Compiling these, not the whole UNet, compiles each distinct block
# once (SDXL's 70 transformer blocks come in two widths), so compiling takes seconds, not minutes,
# and switching adapters (teacher / student / EMA / fake) only adds one variant per block kind.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "Transformer2DModel")


def enable_tf32() -> None:
    """TF32 matrix units for the float32 work that is left (optimizer-side, fp32 LoRA layers)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """NHWC weights: cuDNN's fast convolution kernels on tensor cores take this layout."""
    return module.to(memory_format=torch.channels_last)


def compile_blocks(unet: torch.nn.Module, kinds=("BasicTransformerBlock", "ResnetBlock2D"), **options) -> int:
    """torch.compile each repeated block in place; returns how many were compiled.

    Blocks of one kind share their compiled code (modules are graph inputs), with one variant per
    shape and adapter state: the cache must hold them all, or dynamo would fall back to eager.
    """
    import torch._dynamo

    unknown = set(kinds) - set(REPEATED_BLOCKS)
    if unknown:
        raise HypersdError(f"cannot compile block kind(s) {sorted(unknown)}; choose from {', '.join(REPEATED_BLOCKS)}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    n = 0
    for module in unet.modules():
        if type(module).__name__ in kinds:
            module.compile(**options)
            n += 1
    return n


def gradient_checkpointing(unet: torch.nn.Module) -> None:
    """Recompute block activations in the backward pass: the student's memory falls to about a block's.

    The recomputation runs during ``backward``, when another adapter may be active than when the
    block ran (the discriminator reads the student's output with adapters off): each block's
    adapter state is captured on the way forward and put back for its recomputation.
    """
    from torch.utils.checkpoint import checkpoint

    # peft's flags written directly: its setters would also flip the weights' requires_grad mid-backward
    from hypersd.lora.adapters import _flags, _set_flags

    def run_checkpointed(block, *args):
        layers = _tuner_layers(block)
        state = _flags(layers)

        def recompute(*inputs):
            now = _flags(layers)
            _set_flags(layers, state)
            try:
                return block(*inputs)
            finally:
                _set_flags(layers, now)

        return checkpoint(recompute, *args, use_reentrant=False)

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=run_checkpointed)


def _tuner_layers(block: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = block.__dict__.get("_hypersd_tuner_layers")
    if layers is None:  # found once per block: the walk would cost more than the block on small inputs
        layers = block.__dict__["_hypersd_tuner_layers"] = [m for m in block.modules() if isinstance(m, BaseTunerLayer)]
    return layers


def optimizer(params, lr: float, kind: str = "adamw", weight_decay: float = 0.0, betas=None):
    """AdamW for the LoRA weights: fused into one kernel on CUDA, or bitsandbytes' 8-bit AdamW.
    ``betas``: [β1, β2] (a recipe's ``betas`` / ``fake_betas``); None: AdamW's (0.9, 0.999)."""
    params = list(params)
    betas = (0.9, 0.999) if betas is None else (float(betas[0]), float(betas[1]))
    if kind == "adamw":
        on_cuda = bool(params) and all(p.is_cuda for p in params)
        # elsewhere foreach, which torch picks only on CUDA: bit for bit the per-tensor loop's
        # arithmetic, a third faster over a LoRA's hundreds of small tensors (CPU, docs/SPEED.md)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=on_cuda or None,
                                 foreach=None if on_cuda else True)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise HypersdError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                               "(CUDA only), or use optimizer 'adamw'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas)
    raise HypersdError(f"unknown optimizer {kind!r}; use 'adamw' or 'adamw8bit'")


class CompiledInference:
    """A diffusers pipeline's UNet and its VAE's decoder, compiled, next to the eager ones.

    On a GPU ``reduce-overhead`` also captures CUDA graphs: at batch 1 a one-step image is bound
    by the launches of about a thousand small kernels, which one graph replay collapses. The
    eager modules stay as they are; ``use(True/False)`` switches the pipeline between the two,
    so a caller can check the compiled path against the eager one before trusting it.
    """

    def __init__(self, pipe, vae, backend="inductor", mode: str | None = None):
        self.pipe, self.vae = pipe, vae
        options = {"backend": backend, "dynamic": False}  # one specialisation per batch size
        if mode is not None:
            options["mode"] = mode
        self.eager = (pipe.unet, vae.decoder)
        self.compiled = tuple(torch.compile(m, **options) for m in self.eager)
        self.active = False

    def use(self, compiled: bool) -> None:
        unet, decoder = self.compiled if compiled else self.eager
        self.pipe.unet = unet  # the pipeline's own setter; a compiled module keeps the UNet's config
        self.vae.decoder = decoder
        self.active = compiled
