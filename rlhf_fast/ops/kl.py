"""Public per-token KL estimator op."""
from __future__ import annotations

import torch

from .. import _validation as v
from .._dispatch import resolve
from ..reference.kl import KL_ESTIMATORS


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from ``r = logp - ref_logp``: k1 ``r``, k2 ``r^2 / 2``,
    k3 ``exp(-r) - 1 + r``. Float32, differentiable with respect to ``logp``."""
    v.check_float("logp", logp)
    v.check_float("ref_logp", ref_logp)
    v.check_shape("ref_logp", ref_logp, logp.shape, "logp")
    v.check_same_device({"logp": logp, "ref_logp": ref_logp})
    v.check_option("estimator", estimator, KL_ESTIMATORS)
    impl = resolve("token_kl", logp.device)
    return impl(logp, ref_logp, estimator=estimator)
