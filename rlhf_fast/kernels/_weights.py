"""Per-token loss weights: every aggregation mode as ``loss = sum(l * w)``.

The weights depend only on the mask (and the count overrides). Plain torch: a handful of small reductions. No
kernel uses it any more -- the PPO losses (``losses.py``) and the fused loss from logits (``fused_loss.py``) apply
the mode in their single-program finalize kernel, as a per-row factor ``f_r`` (``w = m * f_r``) -- it stays as the
per-token statement of the modes, checked against ``reference.losses.aggregate`` by the tests.
"""
from __future__ import annotations

import torch

from ..reference.losses import AGG_MODES


def _count(value, like: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=torch.float32).reshape(())
    # A number divides as a Python scalar: a fresh device tensor would be a blocking host-to-device copy.
    return float(value)


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
