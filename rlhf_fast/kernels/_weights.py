"""Per-token loss weights: every aggregation mode as ``loss = sum(l * w)``.

The weights depend only on the mask (and the count overrides), so the kernels compute them once, before the
loss pass, and the backward is just ``dl * w * upstream``. Plain torch: it is a handful of small reductions.
"""
from __future__ import annotations

import torch

from ..reference.losses import AGG_MODES


def _count(value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), device=like.device, dtype=torch.float32)


def token_weights(mask: torch.Tensor, agg: str, *, num_tokens=None, num_seqs=None, loss_scale=None) -> torch.Tensor:
    """Float32 ``[R, T]`` weights with ``aggregate(l, mask, agg) == (l * w).sum()`` (0 where mask is 0)."""
    m = (mask != 0).to(torch.float32)
    if agg == "token-sum":
        return m
    if agg == "token-mean":
        tokens = m.sum().clamp(min=1.0) if num_tokens is None else _count(num_tokens, m)
        return m / tokens
    if agg not in AGG_MODES:
        raise ValueError(f"agg: expected one of {list(AGG_MODES)}, got {agg!r}")
    tokens_per_row = m.sum(-1, keepdim=True)
    seqs = (tokens_per_row > 0).sum().clamp(min=1).to(torch.float32) if num_seqs is None else _count(num_seqs, m)
    w = m / seqs
    if agg == "seq-mean-token-mean":
        w = w / tokens_per_row.clamp(min=1.0)
    elif agg == "seq-mean-token-sum-norm":
        w = w / (float(max(m.shape[-1], 1)) if loss_scale is None else _count(loss_scale, m))
    return w
