"""hypersd: Hyper-SD distillation (segmented consistency, feedback, score distillation, one LoRA)."""

__version__ = "0.1.0"
