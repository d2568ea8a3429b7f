"""Public GAE and masked whitening."""
from __future__ import annotations

import numpy as np
import torch

from .. import _validation as v
from .._dispatch import native_module, requested_backend, resolve


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-aware GAE over ``[B, T]`` (see docs/API.md): masked tokens are skipped, their outputs are 0.

    Returns float32 ``(advantages, returns)``; no gradient flows. On CPU the C++ sweep runs when the extension
    is built (``RLHF_FAST_BACKEND=torch`` forces the reference loop).
    """
    v.check_float("rewards", rewards)
    v.check_ndim("rewards", rewards, (2,), "a 2-d tensor [B, T]")
    v.check_float("values", values)
    v.check_shape("values", values, rewards.shape, "rewards")
    v.check_mask("mask", mask)
    v.check_shape("mask", mask, rewards.shape, "rewards")
    v.check_same_device({"rewards": rewards, "values": values, "mask": mask})
    gamma = v.check_number("gamma", gamma, at_least=0.0, at_most=1.0)
    lam = v.check_number("lam", lam, at_least=0.0, at_most=1.0)
    native = native_module()
    if rewards.device.type == "cpu" and requested_backend() is None and native is not None:
        return _gae_native(native, rewards, values, mask, gamma, lam)
    return resolve("gae", rewards.device)(rewards, values, mask, gamma=gamma, lam=lam)


def _gae_native(native, rewards, values, mask, gamma, lam):
    # Conversions happen in NumPy, single-threaded: torch's parallel casts made this ~1 ms call spin for
    # 10+ ms on a loaded 2-core machine while waiting for a worker thread.
    def as_numpy(t):
        t = t.detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()  # NumPy has no bfloat16

    advantages, returns = native.gae(
        as_numpy(rewards), as_numpy(values), np.not_equal(as_numpy(mask), 0), gamma, lam
    )
    return torch.from_numpy(advantages), torch.from_numpy(returns)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over the positions with mask 1 (unbiased variance); 0 where mask is 0.

    With ``shift_mean=False`` the mean is added back. Fewer than two valid positions: the variance is taken as 0.
    """
    v.check_float("x", x)
    v.check_mask("mask", mask)
    v.check_shape("mask", mask, x.shape, "x")
    v.check_same_device({"x": x, "mask": mask})
    eps = v.check_number("eps", eps, at_least=0.0)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean: expected a bool, got {type(shift_mean).__name__}")
    impl = resolve("masked_whiten", x.device)
    return impl(x, mask, shift_mean=shift_mean, eps=eps)
