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


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[label]`` for ``logits[N, V]``, ``labels[N]``; float32 ``[N]``."""
    out = []
    for start in range(0, logits.shape[0], ROW_CHUNK):
        z = _scaled(logits[start : start + ROW_CHUNK], temperature)
        lab = labels[start : start + ROW_CHUNK].long().unsqueeze(-1)
        out.append(z.gather(-1, lab).squeeze(-1) - torch.logsumexp(z, dim=-1))
    if not out:
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of the label and the entropy ``-sum p log p`` of ``softmax(logits / temperature)``.

    The entropy uses ``H = lse - sum(p * z)``, which needs finite logits (a -inf logit gives nan).
    """
    logps, entropies = [], []
    for start in range(0, logits.shape[0], ROW_CHUNK):
        z = _scaled(logits[start : start + ROW_CHUNK], temperature)
        lab = labels[start : start + ROW_CHUNK].long().unsqueeze(-1)
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        logps.append(z.gather(-1, lab).squeeze(-1) - lse)
        entropies.append(lse - (p * z).sum(-1))
    if not logps:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(logps), torch.cat(entropies)
