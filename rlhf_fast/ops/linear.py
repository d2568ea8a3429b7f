"""Public ops from hidden states and the LM head weight, never holding the ``[N, V]`` logits."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as v
from .._dispatch import resolve
from .losses import _sequence_rows, sequence_loss_terms
from ._layout import (advantages_as_rows, check_agg_options, check_clip_options, check_importance_sampling_level,
                      check_kl_entropy_options, per_token)


def _check_linear(hidden, weight, labels, bias) -> tuple[int, int]:
    v.check_float("hidden", hidden)
    v.check_min_ndim("hidden", hidden, 2, "a tensor [*, H]")
    v.check_float("weight", weight)
    v.check_ndim("weight", weight, (2,), "a 2-d tensor [V, H] (the LM head)")
    hidden_size = hidden.shape[-1]
    if hidden_size == 0:
        raise ValueError(f"hidden: expected a non-empty hidden dimension H, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden_size:
        raise ValueError(
            f"weight: expected shape [V, {hidden_size}] (H from hidden), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight: expected at least one vocabulary row, got V = 0")
    if bias is not None:
        v.check_float("bias", bias)
        v.check_shape("bias", bias, (vocab,), "weight's first dimension")
    v.check_tensor("labels", labels)
    v.check_shape("labels", labels, hidden.shape[:-1], "hidden without its last dimension")
    v.check_same_device({"hidden": hidden, "weight": weight, "labels": labels, "bias": bias})
    v.check_labels("labels", labels, vocab)
    return vocab, hidden_size


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """``selective_log_softmax(hidden @ weight.T + bias, labels)`` (and the entropy with
    ``return_entropy=True``) without the ``[N, V]`` logits; differentiable in ``hidden``, ``weight``, ``bias``."""
    _, hidden_size = _check_linear(hidden, weight, labels, bias)
    temperature = v.check_number("temperature", temperature, greater_than=0.0)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    impl = resolve("linear_logprobs", hidden.device)
    out = impl(
        hidden.reshape(-1, hidden_size), weight, labels.reshape(-1), bias=bias, temperature=temperature,
        return_entropy=return_entropy,
    )
    if return_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
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
    num_tokens=None,
    num_seqs=None,
    loss_scale=None,
    importance_sampling_level: str = "token",
    cu_seqlens=None,
) -> tuple[torch.Tensor, dict]:
    """The loss and stats of ``fused_ppo_loss(hidden @ weight.T + bias, labels, ...)`` for ``hidden[B, T, H]``
    (or ``[N, H]``), without the ``[N, V]`` logits. ``cu_seqlens``: as in ``fused_ppo_loss`` (with a
    ``seq-mean-*`` mode, ``linear_logprobs`` gives the log-probs and entropies, aggregated per sequence)."""
    _check_linear(hidden, weight, labels, bias)
    shape = labels.shape
    old = per_token("old_logp", old_logp, shape, "labels")
    adv = advantages_as_rows(advantages, shape, "labels")
    m = per_token("mask", mask, shape, "labels", kind="mask")
    w = None if is_weights is None else per_token("is_weights", is_weights, shape, "labels")
    ref, kl_coef, entropy_coef = check_kl_entropy_options(ref_logp, kl_coef, kl_estimator, entropy_coef, shape, "labels")
    v.check_same_device(dict(hidden=hidden, old_logp=old_logp, advantages=advantages, mask=mask,
                             ref_logp=ref_logp, is_weights=is_weights))
    temperature = v.check_number("temperature", temperature, greater_than=0.0)
    clip_low, clip_high, dual_clip = check_clip_options(clip_low, clip_high, dual_clip)
    num_tokens, num_seqs, loss_scale = check_agg_options(agg, num_tokens, num_seqs, loss_scale)
    importance_sampling_level = check_importance_sampling_level(importance_sampling_level)
    segments = _sequence_rows(cu_seqlens, shape, "labels", agg, hidden.device, importance_sampling_level)
    if segments is not None:
        logp, entropy = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                        return_entropy=True)
        return sequence_loss_terms(
            segments, logp, entropy, old, adv, m, w, ref, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
            num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale,
            importance_sampling_level=importance_sampling_level)
    rows, steps = old.shape
    impl = resolve("fused_linear_ppo_loss", hidden.device)
    return impl(
        hidden.reshape(rows, steps, hidden.shape[-1]), weight, labels.reshape(rows, steps), old, adv, m,
        bias=bias, ref_logp=ref, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
        is_weights=w, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale,
        importance_sampling_level=importance_sampling_level,
    )
