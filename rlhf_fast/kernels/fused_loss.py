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
   ``inplace_grad=False`` -- or fp16, leaf or self-overlapping logits, see ``fused_ppo_loss`` -- it runs in the
   backward into a fresh buffer, the upstream gradient read on device.

Masked tokens (``mask == 0``) never read their logits row: their terms and gradient are exactly 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only
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


def _has_internal_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` may share memory (stride 0, e.g. ``expand``), by a cheap stride test.

    Dimensions of size > 1, sorted by stride, must each step over everything the smaller ones span. Layouts
    that fail the test but do not actually overlap only lose the in-place gradient (safe, not wrong).
    """
    span = 1
    for size, stride in sorted((d for d in zip(x.shape, x.stride()) if d[0] > 1), key=lambda d: d[1]):
        if stride < span:
            return True
        span = stride * size
    return False


def _can_write_gradient_inplace(logits3: torch.Tensor) -> bool:
    """Whether the gradient may overwrite ``logits3`` (see ``fused_ppo_loss``); host-side metadata checks only."""
    if logits3.dtype == torch.float16:
        return False  # the upstream gradient (loss scale) must be applied before rounding to fp16
    base = logits3._base if logits3._is_view() else logits3
    if base.is_leaf:
        return False  # the leaf's data would be overwritten and its .grad would alias it
    return not _has_internal_overlap(logits3)


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
            # The logits changed: any other autograd node that saved them (or a view) for its backward now
            # raises autograd's "modified by an inplace operation" error instead of using the gradient as logits.
            # The buffer is kept on ctx, not saved, so this node's own backward does not trip that check.
            torch.autograd.graph.increment_version(logits3)
            ctx.grad_buffer = logits3
            ctx.backward_done = False
        else:
            ctx.save_for_backward(logits3, labels, out["lse"], out["ent"], out["g_logp"], out["g_ent"])
        ctx.inplace_grad = inplace_grad
        ctx.temperature = temperature
        ctx.steps = steps
        loss, stats = _loss_and_stats(out["terms"])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @first_order_only
    def backward(ctx, g_loss, _g_stats):
        if ctx.inplace_grad:
            if ctx.backward_done:
                # The buffer already holds (and handed out) the scaled gradient of the first backward.
                raise RuntimeError(
                    "fused_ppo_loss(inplace_grad=True) supports a single backward; use inplace_grad=False with "
                    "retain_graph"
                )
            ctx.backward_done = True
            grad = ctx.grad_buffer
            ctx.grad_buffer = None
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
    ``[R, T]`` (``advantages`` may be an expanded ``[R] -> [R, T]`` view). Differentiable with respect to
    ``logits`` only, first order only (double backward raises).

    With ``inplace_grad=False`` the logits are never written; the gradient is computed in the backward into a
    fresh buffer, with the upstream gradient applied in float32 before rounding to the logits dtype.

    With ``inplace_grad=True`` (the fast path: no ``[R, T, V]`` allocation) and logits that require grad, the
    gradient of the loss (upstream 1) is computed here and written over ``logits``; the backward returns that
    buffer, rescaled in place when the upstream gradient is not 1. The logits' autograd version counter is
    bumped, so another node that saved ``logits`` (or a view of its storage) for its own backward raises
    autograd's "modified by an inplace operation" error rather than using the gradient as logits; pass
    ``inplace_grad=False`` then. The node supports a single backward: a second one (``retain_graph=True``)
    raises. The out-of-place path is taken instead, whatever ``inplace_grad`` says, for

    - float16 logits: the gradient would be rounded to fp16 before a loss scale (GradScaler) multiplies it, so
      small entries would flush to zero. bfloat16 and float32 keep the in-place path: they have float32's
      exponent range, so rounding before the scale loses nothing but the usual relative precision;
    - leaf logits (or views of a leaf): the leaf's data would be overwritten and its ``.grad`` would alias it;
    - logits whose elements overlap in memory (e.g. an ``expand``-ed view): several rows would write one place.
    """
    rows, steps = old_logp.shape
    vocab = logits.shape[-1]
    # Constants of the loss even if they require grad (only the logits are differentiable).
    old_logp, advantages, mask = old_logp.detach(), advantages.detach(), mask.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    is_weights = None if is_weights is None else is_weights.detach()
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
        inplace = bool(inplace_grad) and _can_write_gradient_inplace(logits3)
        loss, fractions = _FusedPPOLossFunction.apply(logits3, labels, temperature, inplace, kwargs)
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
