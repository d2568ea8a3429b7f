"""Reference log-probs and entropy from logits.

Works in chunks of rows so that only one chunk of float32 logits exists at a time in the forward.
"""
from __future__ import annotations

import torch

from ._precision import upcast

ROW_CHUNK = 2048


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = upcast(logits)
    return z / temperature if temperature != 1.0 else z


def _chunk_starts(logits: torch.Tensor) -> range:
    # At least one (possibly empty) chunk, so that an empty batch still yields outputs tied to the graph.
    return range(0, max(logits.shape[0], 1), ROW_CHUNK)


def finite_or_zero(z: torch.Tensor) -> torch.Tensor:
    """-inf logits -> 0, so that ``p * z`` is 0 where ``p`` is 0 (in the forward and in the gradient)."""
    return torch.where(z == float("-inf"), 0.0, z)


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[label]`` for ``logits[N, V]`` (or ``[R, T, V]``), ``labels[N]``;
    float32 ``[N]``."""
    logits = logits.reshape(-1, logits.shape[-1])
    out = []
    for start in _chunk_starts(logits):
        z = _scaled(logits[start : start + ROW_CHUNK], temperature)
        lab = labels[start : start + ROW_CHUNK].long().unsqueeze(-1)
        out.append(z.gather(-1, lab).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(out)


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of the label and the entropy ``-sum p log p`` of ``softmax(logits / temperature)``.

    The entropy is ``H = lse - sum(p * z)``; -inf logits (top-k or vocabulary masking) have ``p = 0`` and add
    nothing, instead of ``0 * -inf = nan``.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    logps, entropies = [], []
    for start in _chunk_starts(logits):
        z = _scaled(logits[start : start + ROW_CHUNK], temperature)
        lab = labels[start : start + ROW_CHUNK].long().unsqueeze(-1)
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        logps.append(z.gather(-1, lab).squeeze(-1) - lse)
        entropies.append(lse - (p * finite_or_zero(z)).sum(-1))
    return torch.cat(logps), torch.cat(entropies)
