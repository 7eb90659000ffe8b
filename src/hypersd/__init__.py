"""hypersd: Hyper-SD distillation (segmented consistency, feedback, score distillation, one LoRA)."""

import logging

__version__ = "0.1.0"


class _ImportNotices(logging.Filter):
    """Drops the notices torchao (installed for ``run.quantize_base``) makes each time diffusers
    imports it: its optional GPU kernels built for another Python or torch, its Enum registrations
    that torch calls deprecated, and diffusers' note on torchao-pickled checkpoints, which hypersd
    never loads (weights come from safetensors); and bitsandbytes' (for ``nf4``), on a CPU with
    AVX512-BF16, that its optional 4-bit kernel could not be fetched from the hub (it falls back to
    its own). They would open every command's output, and none says anything about the run."""

    NOTICES = ("Failed to load ", "Skipping import of cpp extensions", "Unable to import `torchao` Tensor objects")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(self.NOTICES) or "is an Enum subclass and is now natively supported" in msg)


for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
              "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).addFilter(_ImportNotices())
