"""Triton fused PPO loss: from ``logits[R, T, V]`` straight to the scalar loss and its gradient.

Two kernels, one program per token row each (Liger's two-pass structure, which runs at ~96% of the bandwidth
bound; see issue 3 for why single-read designs lost in Triton):

1. ``_ppo_fwd_kernel``: one pass over the row (online max / sum-exp / entropy in float32, as in
   ``logprobs.py``), then in registers the per-token PPO terms: log-prob, clipped surrogate with optional
   asymmetric / dual clip and importance weight, KL to the reference policy (k1 / k2 / k3), entropy bonus, and
   the per-token aggregation weight ``w`` (every ``agg`` mode, from ``_weights.token_weights``). It writes
   ``[N, 8]`` per-token sums (weighted loss and the stats numerators) and, when a gradient is needed, the
   per-token ``lse``, ``H``, ``dloss/dlogp`` and ``dloss/dH``.
2. ``logprobs._logits_grad_kernel``: recomputes ``p`` from ``lse`` and writes ``dloss/dlogits`` in the logits
   dtype. With ``inplace_grad=True`` it runs inside the forward and writes over the logits buffer (the backward
   then returns that buffer, scaled by a third kernel only when the upstream gradient is not 1); with
   ``inplace_grad=False`` it runs in the backward into a fresh buffer, the upstream gradient read on device.

Masked tokens (``mask == 0``) never read their logits row: their terms and gradient are exactly 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._ppo_math import ESTIMATOR_CODES, kl_token, policy_token_loss
from ._weights import token_weights
from .logprobs import (
    _inv_temperature,
    _online_lse_pass,
    _strides,
    forward_config,
    launch_logits_grad,
    launch_scale_rows,
)

# Columns of the per-token terms buffer; each is already multiplied by the mask (or the weight for LOSS).
LOSS, CLIPPED, RATIO, APPROX_KL, KL, ENTROPY, DUAL, COUNT = range(8)
NUM_TERMS = 8


@triton.jit
def _ppo_fwd_kernel(
    X,
    stride_xr,
    stride_xt,
    T_INNER,
    LABELS,
    OLD,
    ADV,
    W,
    M,
    REF,
    ISW,
    TERMS,
    LSE,
    ENT,
    G_LOGP,
    G_ENT,
    V,
    inv_t,
    clip_low,
    clip_high,
    dual_clip,
    kl_coef,
    ent_coef,
    HAS_TEMP: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_ISW: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    ENT_IN_LOSS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    terms = TERMS + n * 8
    mk = tl.load(M + n)
    if mk == 0.0:
        for k in tl.static_range(8):
            tl.store(terms + k, 0.0)
        if NEED_GRAD:
            tl.store(G_LOGP + n, 0.0)
            if ENT_IN_LOSS:
                tl.store(G_ENT + n, 0.0)
        return
    inv_t = tl.cast(inv_t, tl.float32)
    clip_low = tl.cast(clip_low, tl.float32)
    clip_high = tl.cast(clip_high, tl.float32)
    dual_clip = tl.cast(dual_clip, tl.float32)
    kl_coef = tl.cast(kl_coef, tl.float32)
    ent_coef = tl.cast(ent_coef, tl.float32)

    r = n // T_INNER
    tt = n - r * T_INNER
    x_ptr = X + r * stride_xr + tt * stride_xt
    m, s, t = _online_lse_pass(x_ptr, V, inv_t, HAS_TEMP, True, BLOCK_V)
    log_s = tl.log(s)
    lse = m + log_s
    ent = log_s - t / s
    label = tl.load(LABELS + n).to(tl.int64)
    z_label = tl.load(x_ptr + label).to(tl.float32)
    if HAS_TEMP:
        z_label = z_label * inv_t
    logp = z_label - lse

    w = tl.load(W + n)
    old = tl.load(OLD + n).to(tl.float32)
    adv = tl.load(ADV + n).to(tl.float32)
    loss, g, clipped, capped = policy_token_loss(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
    if HAS_ISW:
        isw = tl.load(ISW + n).to(tl.float32)
        loss = loss * isw
        g = g * isw
    kl = tl.zeros((), tl.float32)
    if HAS_REF:
        ref = tl.load(REF + n).to(tl.float32)
        kl, dkl = kl_token(logp, ref, KL_EST)
        if KL_IN_LOSS:
            loss = loss + kl_coef * kl
            g = g + kl_coef * dkl
    if ENT_IN_LOSS:
        loss = loss - ent_coef * ent
    log_ratio = logp - old
    ratio = tl.exp(log_ratio)
    approx_kl = tl.exp(-log_ratio) - 1.0 + log_ratio  # k3 of (logp, old_logp), the reference's approx_kl

    tl.store(terms + 0, w * loss)
    tl.store(terms + 1, mk * clipped)
    tl.store(terms + 2, mk * ratio)
    tl.store(terms + 3, mk * approx_kl)
    tl.store(terms + 4, mk * kl)
    tl.store(terms + 5, mk * ent)
    tl.store(terms + 6, mk * capped)
    tl.store(terms + 7, mk)
    if NEED_GRAD:
        tl.store(LSE + n, lse)
        tl.store(G_LOGP + n, w * g)
        if ENT_IN_LOSS:
            tl.store(ENT + n, ent)
            tl.store(G_ENT + n, -(w * ent_coef))


def _flat(t: Optional[torch.Tensor], rows: int, steps: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.expand(rows, steps).contiguous().view(-1)


def fused_forward(
    logits3: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor],
    is_weights: Optional[torch.Tensor],
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    temperature: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    need_grad: bool,
) -> dict:
    """Launch the statistics / loss pass over ``logits3[R, T, V]`` (last dimension contiguous).

    Per-token inputs are flat contiguous ``[R * T]``. Returns the ``[N, 8]`` terms and, with ``need_grad``, the
    per-token ``lse``, ``ent``, ``g_logp``, ``g_ent`` (``ent`` / ``g_ent`` None when the entropy is not in the loss).
    """
    rows, steps, vocab = logits3.shape
    n = rows * steps
    dev = logits3.device
    terms = torch.empty(n, NUM_TERMS, dtype=torch.float32, device=dev)
    ent_in_loss = entropy_coef != 0.0
    out = {"terms": terms, "lse": None, "ent": None, "g_logp": None, "g_ent": None}
    if need_grad:
        out["lse"] = torch.empty(n, dtype=torch.float32, device=dev)
        out["g_logp"] = torch.empty(n, dtype=torch.float32, device=dev)
        if ent_in_loss:
            out["ent"] = torch.empty(n, dtype=torch.float32, device=dev)
            out["g_ent"] = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    inv_t, has_temp = _inv_temperature(temperature)
    xs = _strides(logits3)
    dummy = terms
    _ppo_fwd_kernel[(n,)](
        logits3, xs[0], xs[1], steps, labels, old_logp, advantages, weights, mask,
        dummy if ref_logp is None else ref_logp, dummy if is_weights is None else is_weights,
        terms, *(dummy if out[k] is None else out[k] for k in ("lse", "ent", "g_logp", "g_ent")),
        vocab, inv_t, float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef),
        float(entropy_coef),
        HAS_TEMP=has_temp, HAS_REF=ref_logp is not None, KL_IN_LOSS=ref_logp is not None and kl_coef != 0.0,
        KL_EST=ESTIMATOR_CODES[kl_estimator], HAS_ISW=is_weights is not None, HAS_DUAL=dual_clip is not None,
        ENT_IN_LOSS=ent_in_loss, NEED_GRAD=need_grad, **forward_config(vocab),
    )
    return out


def _loss_and_stats(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sums = terms.sum(0)
    return sums[LOSS], sums[CLIPPED:COUNT] / sums[COUNT].clamp(min=1.0)


class _FusedPPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits3, labels, temperature, inplace_grad, kwargs):
        out = fused_forward(logits3, labels, temperature=temperature, need_grad=True, **kwargs)
        steps = logits3.shape[1]
        if inplace_grad:
            # The gradient overwrites the logits now; the backward only rescales it (rarely).
            launch_logits_grad(
                logits3, logits3, labels, out["lse"], out["ent"], out["g_logp"], out["g_ent"], None, temperature,
                t_inner=steps,
            )
            ctx.save_for_backward(logits3)
        else:
            ctx.save_for_backward(logits3, labels, out["lse"], out["ent"], out["g_logp"], out["g_ent"])
        ctx.inplace_grad = inplace_grad
        ctx.temperature = temperature
        ctx.steps = steps
        loss, stats = _loss_and_stats(out["terms"])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        if ctx.inplace_grad:
            (grad,) = ctx.saved_tensors
            # Rescales only when the upstream gradient is not 1, decided on the device (no sync).
            launch_scale_rows(grad, g_loss.float().contiguous(), t_inner=ctx.steps)
            return grad, None, None, None, None
        logits3, labels, lse, ent, g_logp, g_ent = ctx.saved_tensors
        grad = torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)
        launch_logits_grad(
            logits3, grad, labels, lse, ent, g_logp, g_ent, g_loss.float().contiguous(), ctx.temperature,
            t_inner=ctx.steps,
        )
        return grad, None, None, None, None


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
) -> tuple[torch.Tensor, dict]:
    """``logits[R, T, V]`` -> policy loss + ``kl_coef * agg(kl)`` - ``entropy_coef * agg(entropy)``, and stats.

    Same signature and numbers as ``rlhf_fast.reference.losses.fused_ppo_loss``. Per-token tensors are
    ``[R, T]`` (``advantages`` may be an expanded ``[R] -> [R, T]`` view). With ``inplace_grad=True`` and a
    logits tensor that requires grad, the gradient is computed here and written over ``logits``; with
    ``inplace_grad=False`` the logits are never written. Differentiable with respect to ``logits`` only.
    """
    rows, steps = old_logp.shape
    vocab = logits.shape[-1]
    logits3 = logits.reshape(rows, steps, vocab)
    if logits3.stride(-1) != 1:
        logits3 = logits3.contiguous()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    weights = token_weights(mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale)
    kwargs = dict(
        old_logp=_flat(old_logp, rows, steps),
        advantages=_flat(advantages, rows, steps),
        weights=_flat(weights, rows, steps),
        mask=_flat(mask.to(torch.float32), rows, steps),
        ref_logp=_flat(ref_logp, rows, steps),
        is_weights=_flat(is_weights, rows, steps),
        kl_coef=float(kl_coef),
        kl_estimator=kl_estimator,
        entropy_coef=float(entropy_coef),
        clip_low=float(clip_low),
        clip_high=float(clip_low if clip_high is None else clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip),
    )
    labels = _flat(labels, rows, steps)
    temperature = float(temperature)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, fractions = _FusedPPOLossFunction.apply(logits3, labels, temperature, bool(inplace_grad), kwargs)
    else:
        out = fused_forward(logits3, labels, temperature=temperature, need_grad=False, **kwargs)
        loss, fractions = _loss_and_stats(out["terms"])
    clip_frac, ratio_mean, approx_kl, kl, entropy, dual_frac = fractions.unbind(0)
    stats = {"clip_frac": clip_frac, "approx_kl": approx_kl, "ratio_mean": ratio_mean}
    if dual_clip is not None:
        stats["dual_clip_frac"] = dual_frac
    stats["kl"] = kl if ref_logp is not None else torch.zeros((), dtype=torch.float32, device=logits.device)
    stats["entropy"] = entropy
    return loss, stats


KERNELS = {"fused_ppo_loss": fused_ppo_loss}
