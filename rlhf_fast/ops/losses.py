"""Public PPO losses: clipped policy loss, clipped value loss and the fused loss from logits.

Each validates its input, brings per-token tensors to rows x time ``[R, T]`` (``[N]`` is one row; ``[*, T]``
folds the leading dimensions into rows) and dispatches. The aggregation modes and the ``num_tokens`` /
``num_seqs`` / ``loss_scale`` overrides are described in docs/API.md; validation reads a tensor override once and
passes it on as a Python float, so the kernels never sync on it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as v
from .._dispatch import resolve
from ._layout import (
    advantages_as_rows,
    as_rows,
    check_agg_options,
    check_clip_options,
    check_importance_sampling_level,
    check_kl_entropy_options,
    check_per_token_shape,
    per_token,
)
from .logprobs import check_logits_and_labels


def _policy_inputs(logp_name, logp_shape, old_logp, advantages, mask, is_weights):
    old = per_token("old_logp", old_logp, logp_shape, logp_name)
    adv = advantages_as_rows(advantages, logp_shape, logp_name)
    m = per_token("mask", mask, logp_shape, logp_name, kind="mask")
    w = None if is_weights is None else per_token("is_weights", is_weights, logp_shape, logp_name)
    return old, adv, m, w


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
    num_tokens=None,
    num_seqs=None,
    loss_scale=None,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict]:
    """Clipped PPO surrogate; returns ``(loss, stats)`` with ``clip_frac``, ``approx_kl``, ``ratio_mean``."""
    v.check_float("logp", logp)
    check_per_token_shape("logp", logp)
    old, adv, m, w = _policy_inputs("logp", logp.shape, old_logp, advantages, mask, is_weights)
    v.check_same_device(dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, is_weights=is_weights))
    clip_low, clip_high, dual_clip = check_clip_options(clip_low, clip_high, dual_clip)
    num_tokens, num_seqs, loss_scale = check_agg_options(agg, num_tokens, num_seqs, loss_scale)
    importance_sampling_level = check_importance_sampling_level(importance_sampling_level)
    impl = resolve("ppo_policy_loss", logp.device)
    return impl(
        as_rows(logp), old, adv, m, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
        is_weights=w, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale,
        importance_sampling_level=importance_sampling_level,
    )


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    loss_scale=None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clipped v - R)^2)``; returns ``(loss, stats)``."""
    v.check_float("values", values)
    check_per_token_shape("values", values)
    old = per_token("old_values", old_values, values.shape, "values")
    ret = per_token("returns", returns, values.shape, "values")
    m = per_token("mask", mask, values.shape, "values", kind="mask")
    v.check_same_device(dict(values=values, old_values=old_values, returns=returns, mask=mask))
    if clip is not None:
        clip = v.check_number("clip", clip, at_least=0.0)
    num_tokens, num_seqs, loss_scale = check_agg_options(agg, num_tokens, num_seqs, loss_scale)
    impl = resolve("ppo_value_loss", values.device)
    return impl(
        as_rows(values), old, ret, m, clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
        loss_scale=loss_scale,
    )


def fused_ppo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
    inplace_grad: bool = True,
    num_tokens=None,
    num_seqs=None,
    loss_scale=None,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict]:
    """From ``logits[B, T, V]`` (or ``[N, V]``) to the scalar policy loss
    ``ppo_policy_loss(logp) + kl_coef * agg(token_kl(logp, ref_logp)) - entropy_coef * agg(entropy)``.

    ``stats`` adds the masked means ``kl`` and ``entropy``. With ``inplace_grad=True`` the Triton path may write
    the gradient into the ``logits`` buffer: do not read ``logits`` after the call.
    """
    vocab = check_logits_and_labels(logits, labels)
    shape = labels.shape
    old, adv, m, w = _policy_inputs("labels", shape, old_logp, advantages, mask, is_weights)
    ref, kl_coef, entropy_coef = check_kl_entropy_options(ref_logp, kl_coef, kl_estimator, entropy_coef, shape, "labels")
    v.check_same_device(dict(logits=logits, old_logp=old_logp, advantages=advantages, mask=mask,
                             ref_logp=ref_logp, is_weights=is_weights))
    temperature = v.check_number("temperature", temperature, greater_than=0.0)
    clip_low, clip_high, dual_clip = check_clip_options(clip_low, clip_high, dual_clip)
    num_tokens, num_seqs, loss_scale = check_agg_options(agg, num_tokens, num_seqs, loss_scale)
    importance_sampling_level = check_importance_sampling_level(importance_sampling_level)
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad: expected a bool, got {type(inplace_grad).__name__}")
    rows, steps = old.shape
    impl = resolve("fused_ppo_loss", logits.device)
    return impl(
        logits.reshape(rows, steps, vocab), as_rows(labels), old, adv, m, ref_logp=ref, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, temperature=temperature, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=w, inplace_grad=inplace_grad,
        num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale,
        importance_sampling_level=importance_sampling_level,
    )
