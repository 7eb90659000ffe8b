"""LoRA algebra on adapter states: an exact merge of two, and the nearest LoRA of a lower rank."""

from __future__ import annotations

import torch

from hypersd.errors import HypersdError


def merge_states(a: dict[str, torch.Tensor], spec_a: dict, b: dict[str, torch.Tensor], spec_b: dict,
                 ratio: float = 1.0) -> tuple[dict[str, torch.Tensor], dict]:
    """One LoRA equal to ``a + ratio·b``, exactly: the ranks stack (A rows, B columns).

    Each LoRA adds (alpha/r)·B·A to its layer; the merged one has alpha = rank, so scale 1, and
    carries the two scales in its B columns. So the ranks need not match, only the layers: stacked
    factors of ranks r_a and r_b multiply to the sum of the two updates for any r_a, r_b.
    """
    if spec_a["targets"] != spec_b["targets"] or set(a) != set(b):
        raise HypersdError(f"cannot merge LoRAs with different targets ({spec_a['targets']} vs {spec_b['targets']}); "
                           f"train both with the same lora_targets")
    scale_a, scale_b = spec_a["alpha"] / spec_a["rank"], ratio * spec_b["alpha"] / spec_b["rank"]
    out = {}
    for k in a:
        if ".lora_A." in k:  # (r, in, ...): the rank is dim 0
            dim = 0
        elif ".lora_B." in k:  # (out, r, ...): the rank is dim 1
            dim = 1
        else:
            raise HypersdError(f"cannot merge: unexpected key {k} (only lora_A/lora_B weights are merged)")
        if _without(a[k].shape, dim) != _without(b[k].shape, dim):
            raise HypersdError(f"cannot merge: {k} has shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}")
        out[k] = torch.cat([a[k], b[k]], 0) if dim == 0 else torch.cat([scale_a * a[k], scale_b * b[k]], 1)
    rank = spec_a["rank"] + spec_b["rank"]
    return out, {"rank": rank, "alpha": rank, "targets": spec_a["targets"]}


def _without(shape: torch.Size, dim: int) -> tuple[int, ...]:
    return tuple(shape[:dim]) + tuple(shape[dim + 1:])


def compress_state(state: dict[str, torch.Tensor], spec_: dict, rank: int,
                   generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA of rank ``rank`` nearest to ``state``: per layer, the truncated SVD of its update
    (alpha/r)·B·A, the best rank-``rank`` approximation in Frobenius norm (Eckart-Young).

    Exact where the update's rank fits. A merge stacks ranks, and every later student pass pays for
    the stacked rank; this brings it back. The result has alpha = rank (scale 1), and each layer's
    singular values split evenly between A and B, so both factors train at a like scale.
    """
    if rank < 1:
        raise HypersdError(f"a LoRA's rank must be >= 1, got {rank}")
    scale = spec_["alpha"] / spec_["rank"]
    out = {}
    for key_a in state:
        if ".lora_A." not in key_a:
            if ".lora_B." not in key_a:
                raise HypersdError(f"cannot compress: unexpected key {key_a} "
                                   f"(only lora_A/lora_B weights are compressed)")
            continue
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if key_b not in state:
            raise HypersdError(f"cannot compress: {key_a} has no {key_b}")
        out[key_a], out[key_b] = _truncated_factors(state[key_a], scale * state[key_b], rank, generator)
    return out, {"rank": rank, "alpha": rank, "targets": spec_["targets"]}


def _truncated_factors(a: torch.Tensor, b: torch.Tensor, rank: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank ``rank`` with B'·A' the truncated SVD of B·A, for linear and conv LoRAs.

    A conv LoRA is A: (r, in, kh, kw) then a 1x1 B: (out, r, 1, 1), so flattened it is the same
    product of an (out, r) and an (r, in·kh·kw) matrix. The SVD goes through QR factors of B and Aᵀ,
    never the full out × in·kh·kw product: on SDXL's widest layers that stays cheap.
    """
    r = a.shape[0]
    a2, b2 = a.reshape(r, -1).double(), b.reshape(b.shape[0], r).double()
    q_b, r_b = torch.linalg.qr(b2)  # B = Q_b R_b
    q_a, r_a = torch.linalg.qr(a2.T)  # Aᵀ = Q_a R_a, so B·A = Q_b (R_b R_aᵀ) Q_aᵀ
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    # the components the update has: at most ``rank``, and none whose singular value is numerically 0
    k = int((s[:rank] > s.max().clamp_min(1e-30) * 1e-10).sum()) if len(s) else 0
    root = s[:k].sqrt()
    new_b = torch.zeros(b2.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a2.shape[1], dtype=torch.float64)
    new_b[:, :k] = (q_b @ u[:, :k]) * root
    new_a[:k] = root[:, None] * (vh[:k] @ q_a.T)
    # Past the update's own rank, the new rows start as a fresh LoRA does (random A, zero B): the
    # product stays exact, and they can still learn (zero rows in both factors never would).
    new_a[k:] = torch.randn(rank - k, a2.shape[1], generator=generator, dtype=torch.float64) / a2.shape[1] ** 0.5
    return (new_a.reshape(rank, *a.shape[1:]).to(a.dtype),
            new_b.reshape(b.shape[0], rank, *b.shape[2:]).to(b.dtype))
