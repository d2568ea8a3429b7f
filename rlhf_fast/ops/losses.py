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
from ._segments import SEQUENCE_MODES, SegmentRows, check_cu_seqlens
from .logprobs import check_logits_and_labels, logprobs_and_entropy


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
    cu_seqlens=None,
) -> tuple[torch.Tensor, dict]:
    """Clipped PPO surrogate; returns ``(loss, stats)`` with ``clip_frac``, ``approx_kl``, ``ratio_mean``.

    ``cu_seqlens``: sequence boundaries of a packed row ``[N]`` / ``[1, N]`` (used by the ``seq-mean-*`` modes)."""
    v.check_float("logp", logp)
    check_per_token_shape("logp", logp)
    old, adv, m, w = _policy_inputs("logp", logp.shape, old_logp, advantages, mask, is_weights)
    v.check_same_device(dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, is_weights=is_weights))
    clip_low, clip_high, dual_clip = check_clip_options(clip_low, clip_high, dual_clip)
    num_tokens, num_seqs, loss_scale = check_agg_options(agg, num_tokens, num_seqs, loss_scale)
    importance_sampling_level = check_importance_sampling_level(importance_sampling_level)
    logp = as_rows(logp)
    rows = _sequence_rows(cu_seqlens, logp.shape, "logp", agg, logp.device, importance_sampling_level)
    if rows is not None:
        logp, old, adv, m, w = (rows(t) for t in (logp, old, adv, m, w))
        loss_scale = rows.width if loss_scale is None else loss_scale
    impl = resolve("ppo_policy_loss", logp.device)
    return impl(
        logp, old, adv, m, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
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
    cu_seqlens=None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clipped v - R)^2)``; returns ``(loss, stats)``.

    ``cu_seqlens``: sequence boundaries of a packed row ``[N]`` / ``[1, N]`` (used by the ``seq-mean-*`` modes)."""
    v.check_float("values", values)
    check_per_token_shape("values", values)
    old = per_token("old_values", old_values, values.shape, "values")
    ret = per_token("returns", returns, values.shape, "values")
    m = per_token("mask", mask, values.shape, "values", kind="mask")
    v.check_same_device(dict(values=values, old_values=old_values, returns=returns, mask=mask))
    if clip is not None:
        clip = v.check_number("clip", clip, at_least=0.0)
    num_tokens, num_seqs, loss_scale = check_agg_options(agg, num_tokens, num_seqs, loss_scale)
    values = as_rows(values)
    rows = _sequence_rows(cu_seqlens, values.shape, "values", agg, values.device)
    if rows is not None:
        values, old, ret, m = (rows(t) for t in (values, old, ret, m))
        loss_scale = rows.width if loss_scale is None else loss_scale
    impl = resolve("ppo_value_loss", values.device)
    return impl(
        values, old, ret, m, clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
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
    cu_seqlens=None,
) -> tuple[torch.Tensor, dict]:
    """From ``logits[B, T, V]`` (or ``[N, V]``) to the scalar policy loss
    ``ppo_policy_loss(logp) + kl_coef * agg(token_kl(logp, ref_logp)) - entropy_coef * agg(entropy)``.

    ``stats`` adds the masked means ``kl`` and ``entropy``. With ``inplace_grad=True`` the Triton path may write
    the gradient into the ``logits`` buffer: do not read ``logits`` after the call.

    ``cu_seqlens``: sequence boundaries of a packed row (``logits[1, N, V]`` or ``[N, V]``). With a ``seq-mean-*``
    mode the log-probs and entropies come from ``logprobs_and_entropy`` and are aggregated per sequence (the
    logits are then kept for the backward instead of being overwritten in place).
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
    segments = _sequence_rows(cu_seqlens, shape, "labels", agg, logits.device, importance_sampling_level)
    if segments is not None:
        logp, entropy = logprobs_and_entropy(logits, labels, temperature=temperature)
        return sequence_loss_terms(
            segments, logp, entropy, old, adv, m, w, ref, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
            num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale,
            importance_sampling_level=importance_sampling_level)
    rows, steps = old.shape
    impl = resolve("fused_ppo_loss", logits.device)
    return impl(
        logits.reshape(rows, steps, vocab), as_rows(labels), old, adv, m, ref_logp=ref, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, temperature=temperature, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=w, inplace_grad=inplace_grad,
        num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale,
        importance_sampling_level=importance_sampling_level,
    )


def _sequence_rows(cu_seqlens, shape, name: str, agg: str, device, importance_sampling_level: str = "token"):
    """One row per sequence of a packed row (on ``device``) when ``agg`` or a sequence-level ratio (GSPO) needs
    the boundaries; None otherwise."""
    bounds = check_cu_seqlens(cu_seqlens, shape, name)
    if bounds is None or (agg not in SEQUENCE_MODES and importance_sampling_level != "sequence"):
        return None
    return SegmentRows(bounds, device)


def sequence_loss_terms(segments, logp, entropy, old, adv, mask, is_weights, ref_logp, *, loss_scale=None,
                        **kwargs) -> tuple[torch.Tensor, dict]:
    """Both fused losses on a packed row with a ``seq-mean-*`` mode: per-token log-probs and entropies of the
    row, laid out one sequence per row, then the same composition as the fused ops' definition."""
    from ..reference.losses import policy_loss_terms

    rows = [segments(t) for t in (logp, entropy, old, adv, mask, is_weights, ref_logp)]
    logp, entropy, old, adv, mask, is_weights, ref_logp = rows
    return policy_loss_terms(logp, entropy, old, adv, mask, ref_logp=ref_logp, is_weights=is_weights,
                             loss_scale=segments.width if loss_scale is None else loss_scale, **kwargs)
