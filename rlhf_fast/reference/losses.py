"""Reference loss aggregation and the clipped PPO policy and value losses.

Per-token tensors here are ``[B, T]``: rows are sequences, the last dimension is time. The public ops bring
any other layout to this one before calling in.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ._precision import upcast

from .kl import token_kl
from .logprobs import logprobs_and_entropy

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
Count = Optional[Union[float, int, torch.Tensor]]


def aggregate(
    losses: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    num_tokens: Count = None,
    num_seqs: Count = None,
    loss_scale: Count = None,
) -> torch.Tensor:
    """Turn per-token losses ``[B, T]`` into a scalar; a batch with no valid token gives 0.

    Positions with mask 0 are selected away (not multiplied by 0), so nan / inf there never leaks into the loss.
    Counts the batch computes itself are clamped to at least 1 (only an empty batch has none, and its numerator is
    0 too); overrides are used as given (the ops check they are positive and finite).
    """
    valid = mask != 0
    masked = torch.where(valid, upcast(losses), 0.0)
    if agg == "token-sum":
        return masked.sum()
    if agg == "token-mean":
        tokens = valid.sum().clamp(min=1) if num_tokens is None else _as_float(num_tokens, masked)
        return masked.sum() / tokens
    tokens_per_row = valid.sum(-1)
    row_has_tokens = tokens_per_row > 0
    row_sums = masked.sum(-1)
    if agg == "seq-mean-token-mean":
        row_sums = row_sums / tokens_per_row.clamp(min=1)
    seqs = row_has_tokens.sum().clamp(min=1) if num_seqs is None else _as_float(num_seqs, masked)
    loss = torch.where(row_has_tokens, row_sums, 0.0).sum() / seqs
    if agg in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return loss
    if agg == "seq-mean-token-sum-norm":
        scale = float(max(losses.shape[-1], 1)) if loss_scale is None else _as_float(loss_scale, masked)
        return loss / scale
    raise ValueError(f"agg: expected one of {list(AGG_MODES)}, got {agg!r}")


def _as_float(value, like: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(())
    return float(value)


def clamp_closed(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clamp`` whose gradient passes on the closed interval ``[low, high]``, on every torch version.

    torch.clamp's subgradient at the bounds changed between releases (1 in 2.13, 0 in 2.14); the oracle, and
    the kernels checked against it, must not depend on that.
    """
    return torch.where(x < low, low, torch.where(x > high, high, x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    valid = mask != 0
    return torch.where(valid, upcast(x), 0.0).sum() / valid.sum().clamp(min=1)


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
    num_tokens: Count = None,
    num_seqs: Count = None,
    loss_scale: Count = None,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate ``max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))``, optional dual clip for A < 0.

    ``importance_sampling_level="sequence"`` (GSPO, Zheng et al. 2025): every valid token of a row uses the row's
    length-normalised sequence ratio ``exp(mean_t(logp - old_logp))`` over its valid tokens, so the gradient
    reaches each token's ``logp`` through that mean. ``approx_kl`` stays the per-token k3 either way."""
    clip_high = clip_low if clip_high is None else clip_high
    valid = mask != 0
    adv = upcast(advantages.detach())
    if adv.dim() == logp.dim() - 1:  # one advantage per sequence
        adv = adv.unsqueeze(-1).expand_as(logp)
    # Only logp is differentiable (API.md). Masked positions are neutralised before any arithmetic, so padding
    # holding inf / nan (old log-probs of -inf, say) cannot turn into nan gradients through 0 * inf.
    adv = torch.where(valid, adv, 0.0)
    log_ratio = torch.where(valid, upcast(logp) - upcast(old_logp.detach()), 0.0)
    token_log_ratio = log_ratio
    if importance_sampling_level == "sequence":
        row_mean = log_ratio.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = torch.where(valid, row_mean.expand_as(log_ratio), 0.0)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level: expected one of {list(IMPORTANCE_SAMPLING_LEVELS)}, got "
                         f"{importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * clamp_closed(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    dual_capped = None
    if dual_clip is not None:
        dual_capped = (adv < 0) & (-adv * dual_clip < losses)
        losses = torch.where(dual_capped, -adv * dual_clip, losses)
    if is_weights is not None:
        losses = losses * torch.where(valid, upcast(is_weights.detach()), 0.0)
    loss = aggregate(losses, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.exp(-token_log_ratio) - 1.0 + token_log_ratio, mask),  # k3, old vs new
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }
        if dual_capped is not None:
            stats["dual_clip_frac"] = masked_mean(upcast(dual_capped), mask)
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    num_tokens: Count = None,
    num_seqs: Count = None,
    loss_scale: Count = None,
) -> tuple[torch.Tensor, dict]:
    """``0.5 * max((v - R)^2, (old_v + clamp(v - old_v, -clip, clip) - R)^2)``; ``clip=None`` disables clipping."""
    valid = mask != 0
    # Only values is differentiable (API.md); masked positions are neutralised before any arithmetic.
    v = torch.where(valid, upcast(values), 0.0)
    ret = torch.where(valid, upcast(returns.detach()), 0.0)
    unclipped = (v - ret) ** 2
    if clip is None:
        losses = 0.5 * unclipped
        clipped_more = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        old = torch.where(valid, upcast(old_values.detach()), 0.0)
        v_clipped = old + clamp_closed(v - old, -clip, clip)
        clipped = (v_clipped - ret) ** 2
        losses = 0.5 * torch.maximum(unclipped, clipped)
        clipped_more = clipped > unclipped
    loss = aggregate(losses, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(upcast(clipped_more), mask),
            "value_mean": masked_mean(v.detach(), mask),
        }
    return loss, stats


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
    inplace_grad: bool = True,  # noqa: ARG001 - the reference never writes into logits
    **loss_kwargs,
) -> tuple[torch.Tensor, dict]:
    """``logits[B, T, V]`` -> policy loss + ``kl_coef * agg(kl)`` - ``entropy_coef * agg(entropy)``."""
    rows, steps = old_logp.shape
    logp, entropy = logprobs_and_entropy(
        logits.reshape(rows * steps, logits.shape[-1]), labels.reshape(-1), temperature=temperature
    )
    return policy_loss_terms(
        logp.view(rows, steps),
        entropy.view(rows, steps),
        old_logp,
        advantages,
        mask,
        ref_logp=ref_logp,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        **loss_kwargs,
    )


def policy_loss_terms(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    num_tokens: Count = None,
    num_seqs: Count = None,
    loss_scale: Count = None,
    **policy_kwargs,
) -> tuple[torch.Tensor, dict]:
    """The composition behind both fused losses, from per-token log-probs and entropies ``[B, T]``."""
    counts = dict(agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale)
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, **counts, **policy_kwargs)
    if ref_logp is not None:
        valid = mask != 0  # neutralise masked positions first: exp(-r) there may overflow, and 0 * inf = nan
        kl = token_kl(torch.where(valid, logp, 0.0), torch.where(valid, ref_logp.detach(), 0.0), estimator=kl_estimator)
        if kl_coef != 0.0:
            loss = loss + kl_coef * aggregate(kl, mask, **counts)
        stats["kl"] = masked_mean(kl.detach(), mask)
    else:
        stats["kl"] = logp.new_zeros((), dtype=torch.float32)
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * aggregate(entropy, mask, **counts)
    stats["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, stats
