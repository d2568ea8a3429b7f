"""Reference per-token KL estimators (Schulman's k1 / k2 / k3) of KL(pi || ref)."""
from __future__ import annotations

import torch

from ._precision import upcast

KL_ESTIMATORS = ("k1", "k2", "k3")


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    r = upcast(logp) - upcast(ref_logp)
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r * r
    if estimator == "k3":
        return torch.exp(-r) - 1.0 + r
    raise ValueError(f"estimator: expected one of {list(KL_ESTIMATORS)}, got {estimator!r}")
