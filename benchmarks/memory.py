"""The memory arithmetic of a flow model's training step, per memory option: computed, not measured.

Parameter counts come from the released configs (``nets/archs.py``), instantiated on the meta
device (shapes only: seconds on a CPU, no weights). Per option:

  base         the transformer's weights: its linear weights at the option's bytes per weight
               (bf16 2, int8 / fp8 1, nf4 0.5 plus its block scales: ``quant.BYTES_PER_WEIGHT``),
               every other weight (biases, norms, embeddings) in bf16
  LoRA         rank-r LoRA on the transformer preset (``lora.TARGET_PRESETS``): float32 weights of
               the student and of the EMA target (TSCD), the student's float32 gradients and AdamW's
               two moments: 20 bytes per LoRA weight (DMD: student and fake score each train, plus
               the generator average: 36)
  activations  bf16, with gradient checkpointing: every block's input kept (its token count x width
               per stream), plus one block's recomputation during backward, estimated as the inputs
               and outputs of each of its linear layers at the tokens each layer sees (the adaptive
               norms' projections act on one row); without checkpointing every block's
  text + VAE   CLIP(s), T5-XXL's encoder and the VAE, which the teacher holds on the GPU (the cache
               spares their passes, not their weights), in bf16 or quantized (quantize_text_encoders)

Not counted: the CUDA context and allocator slack (about 1 GiB), the teacher's and EMA target's
no-grad passes (transient, about one layer's output), the feedback stage's VAE decode and reward model.

  python benchmarks/memory.py [--models flux,sd35-large,sd3] [--rank 64] [--batch 1] [--resolution 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hypersd.lora.adapters import TARGET_PRESETS, targets_match
from hypersd.nets import archs
from hypersd.nets.quant import BYTES_PER_WEIGHT

GIB = 2**30
BLOCKS = ("transformer_blocks", "single_transformer_blocks")
OPTIONS = ("none", "fp8", "nf4")  # int8 stores as fp8 does: one byte per weight


def _linears(module: torch.nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def weight_split(module: torch.nn.Module) -> tuple[int, int]:
    """(linear weights, every other parameter): what quantization stores smaller, and what it keeps."""
    linear = sum(m.weight.numel() for _, m in _linears(module))
    return linear, sum(p.numel() for p in module.parameters()) - linear


def lora_weights(module: torch.nn.Module, rank: int) -> int:
    targets = TARGET_PRESETS["transformer"]
    return sum(rank * (m.in_features + m.out_features) for n, m in _linears(module) if targets_match(n, targets))


def _layer_tokens(name: str, single: bool, image: int, text: int) -> int:
    if "norm" in name:  # AdaLayerNorm's modulation: a projection of the timestep embedding, one row
        return 1
    if single:  # FLUX's single-stream blocks: image and text tokens as one sequence
        return image + text
    return text if ("add_" in name or "context" in name) else image


def block_activations(model: torch.nn.Module, image: int, text: int) -> tuple[int, int]:
    """(bytes every block's input holds, bytes of the largest block's recomputation), bf16, one sample."""
    kept, largest = 0, 0
    width = model.config.num_attention_heads * model.config.attention_head_dim
    for group in BLOCKS:
        single = group == "single_transformer_blocks"
        for block in getattr(model, group, []):
            kept += 2 * (image + text) * width
            work = sum(2 * (m.in_features + m.out_features) * _layer_tokens(n, single, image, text)
                       for n, m in _linears(block))
            largest = max(largest, work)
    return kept, largest


def rows(name: str, rank: int, batch: int, resolution: int) -> list[dict]:
    model = archs.transformer(name, device="meta", dtype=torch.bfloat16)
    linear, other = weight_split(model)
    n_lora = lora_weights(model, rank)
    image, text = archs.flow_tokens(name, resolution)
    kept, block = block_activations(model, image, text)
    n_blocks = sum(len(getattr(model, g, [])) for g in BLOCKS)
    encoders = archs.flow_text_encoders(name, device="meta", dtype=torch.bfloat16)
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = sum(p.numel() for p in AutoencoderKL(**archs.FLOW_VAE).parameters())
    text_split = [weight_split(e) for e in encoders]
    out = []
    for kind in OPTIONS:
        base = linear * BYTES_PER_WEIGHT[kind] + other * 2
        enc_bf16 = sum(lin + oth for lin, oth in text_split) * 2 + vae * 2
        enc_q = sum(lin * BYTES_PER_WEIGHT[kind] + oth * 2 for lin, oth in text_split) + vae * 2
        acts = batch * (kept + block)
        row = {"model": name, "option": "bf16" if kind == "none" else kind, "params_b": round((linear + other) / 1e9, 3),
               "lora_params_m": round(n_lora / 1e6, 1), "base_gib": base / GIB, "lora_tscd_gib": 20 * n_lora / GIB,
               "lora_dmd_gib": 36 * n_lora / GIB, "acts_ckpt_gib": acts / GIB,
               "acts_no_ckpt_gib": batch * block * n_blocks / GIB,
               "text_vae_gib": enc_bf16 / GIB, "text_vae_quant_gib": enc_q / GIB}
        row["tscd_total_gib"] = row["base_gib"] + row["lora_tscd_gib"] + row["acts_ckpt_gib"] + row["text_vae_gib"]
        row["tscd_total_quant_text_gib"] = row["tscd_total_gib"] - row["text_vae_gib"] + row["text_vae_quant_gib"]
        row["dmd_total_gib"] = row["tscd_total_gib"] - row["lora_tscd_gib"] + row["lora_dmd_gib"]
        out.append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux,sd35-large,sd3")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    table = [r for m in a.models.split(",") for r in rows(m, a.rank, a.batch, a.resolution)]
    print(f"# computed from the released configs on the meta device (not measured): rank {a.rank}, "
          f"batch {a.batch}, {a.resolution} px, GiB")
    print("| model | base weights | transformer | LoRA + EMA + grads + AdamW (TSCD / DMD) | activations, "
          "checkpointing (without) | text encoders + VAE (bf16 / quantized) | TSCD total (quantized text) | DMD total |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} ({r['params_b']} B, LoRA {r['lora_params_m']} M) | {r['option']} | {r['base_gib']:.1f} "
              f"| {r['lora_tscd_gib']:.1f} / {r['lora_dmd_gib']:.1f} | {r['acts_ckpt_gib']:.1f} ({r['acts_no_ckpt_gib']:.0f}) "
              f"| {r['text_vae_gib']:.1f} / {r['text_vae_quant_gib']:.1f} | {r['tscd_total_gib']:.1f} "
              f"({r['tscd_total_quant_text_gib']:.1f}) | {r['dmd_total_gib']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
