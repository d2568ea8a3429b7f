"""Triton fused PPO loss: from ``logits[R, T, V]`` straight to the scalar loss and its gradient.

Three launches per forward + backward (four on the in-place path), and no other device work:

1. ``_ppo_fwd_kernel``, one program per token row (Liger's two-pass structure, which runs at ~96% of the
   bandwidth bound; see issue 3 for why single-read designs lost in Triton): one pass over the row (online max /
   sum-exp / entropy in float32, as in ``logprobs.py``), then in registers the per-token PPO terms: log-prob,
   clipped surrogate with optional asymmetric / dual clip and importance weight, KL to the reference policy
   (k1 / k2 / k3), entropy bonus. The per-token inputs (labels, ``old_logp``, ``advantages``, ``mask``,
   ``ref_logp``, ``is_weights``) are read through their ``[R, T]`` strides: no copies, ``advantages`` may be an
   expanded ``[R]`` (stride 0 along T), the mask bool / int / float. It writes the token's unweighted loss ``l``,
   its validity and its statistic terms into the finalize workspace, and, when a gradient is needed, ``lse``,
   ``H``, and the unweighted factors ``dl/dlogp`` (times ``is_weights``) and ``dl/dH = -entropy_coef``.
2. ``losses._finalize_kernel``, one program (the PPO losses' finalize, the same logic): each token is its own
   row partial (``G = T``) and its own statistic partial (``P = R * T``). It adds them in a fixed order (two
   calls give bitwise-equal results), applies the ``agg`` mode with the ``num_tokens`` / ``num_seqs`` /
   ``loss_scale`` overrides (floats, 0 = from the batch) and writes the loss, the statistics (masked means) and
   the per-row factors ``f_r`` with ``loss = sum_r f_r * sum_t l * m``.
3. ``logprobs._logits_grad_kernel``: recomputes ``p`` from ``lse`` and writes ``dloss/dlogits`` in the logits
   dtype, the token's factors times ``f_r`` (``ROW_SCALE``, indexed by ``token // T``). With
   ``inplace_grad=True`` it runs inside the forward and writes over the logits buffer (the backward then returns
   that buffer, scaled by ``logprobs._scale_rows_kernel`` only when the upstream gradient is not 1, decided on
   the device); with ``inplace_grad=False`` -- or fp16, leaf or self-overlapping logits, see ``fused_ppo_loss``
   -- it runs in the backward into a fresh buffer, the upstream gradient read on the device.

Masked tokens (``mask == 0``) never read their logits row: their terms and gradient are exactly 0. Per-token
values depend only on the token, so they (and with ``token-sum``, ``f_r = 1``, the gradient) are batch invariant.

Float32 workspace of one call, ``N = R * T`` (the layout ``losses._finalize_kernel`` reads, with ``G = T``,
``P = N``): ``[f: R] [l * m: N] [m: N] [statistics: NSTAT * N]``, and ``[k, N]`` per-token gradient inputs
(``lse``, ``dl/dlogp``, and with an entropy term ``H``, ``dl/dH``).

Cost of the single-program finalize (estimated from byte counts, not measured on a GPU): it reads
``(2 + NSTAT) * 4 = 32`` bytes per token (36 with ``seq-mean-token-mean``, which recounts each row for ``f_r``) in
fixed steps of 16-24 KiB, mostly from L2, where the stats pass has just written them: 256 KiB in ~16 steps at
``R * T = 8192`` (the issue's size, a few microseconds at a few hundred ns per step), 32 MiB in ~2000 steps at a
million tokens (about a millisecond). The two big passes move ``~3 * 2 * V`` bytes per token (bf16 logits read
twice and the gradient written) over every SM: ~0.9 MB per token at ``V = 151936``, ~1.8 ms at 8192 tokens and
~0.2 s at a million, so the finalize stays well under 1% of the op at any ``N``; only a small vocabulary (a few
thousand) would make it show, and then a two-level reduction would be the fix.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ._autograd import first_order_only
from ._ppo_math import ESTIMATOR_CODES, kl_token, policy_token_loss
from .logprobs import (
    _inv_temperature,
    _lse,
    _online_lse_pass,
    _strides,
    forward_config,
    launch_logits_grad,
    launch_scale_rows,
)
from .losses import _check_agg, _sequence_level, launch_finalize
from .sequence_ratio import launch_sequence_policy

# Statistic slots of the workspace, in the order of the finalize's outputs after the loss (masked means).
CLIP_FRAC = tl.constexpr(0)
RATIO_MEAN = tl.constexpr(1)
APPROX_KL = tl.constexpr(2)
KL = tl.constexpr(3)
ENTROPY = tl.constexpr(4)
DUAL_FRAC = tl.constexpr(5)
NUM_STATS = 6
NSTAT = tl.constexpr(NUM_STATS)
# The finalize's steps: tokens per step of the per-row sums, tokens per step of the statistics (times NSTAT), and
# its warps. Its loops are not software-pipelined, so each step costs about one memory round trip: wide steps over
# 16 warps (4 and 16 values per thread, no register spills for any T; tests/test_kernels_compile.py).
FINAL_TILE = 2048
FINAL_STAT_BLOCK = 1024
FINAL_WARPS = 16


@triton.jit
def _ppo_fwd_kernel(
    X, stride_xr, stride_xt,
    LABELS, stride_lr, stride_lt,
    OLD, stride_or, stride_ot,
    ADV, stride_ar, stride_at,
    M, stride_mr, stride_mt,
    REF, stride_rr, stride_rt,
    ISW, stride_ir, stride_it,
    WORK,  # float32 finalize workspace (module docstring)
    LSE, ENT, G_LOGP, G_ENT,  # float32 [N] each, written with NEED_GRAD (ENT / G_ENT with ENT_IN_LOSS)
    LOGP_OUT,  # float32 [N]: each valid token's log-prob, written with SEQ for the row kernel
    R, T, V,
    inv_t, clip_low, clip_high, dual_clip, kl_coef, ent_coef,
    HAS_TEMP: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_ISW: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    ENT_IN_LOSS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SEQ: tl.constexpr,  # sequence-level ratio: the policy term is left to sequence_ratio.py's row kernel
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    r = n // T
    tt = n - r * T
    # Workspace: row partial (l * m) at R + n, count (m) at R + N + n, statistic k at R + (2 + k) * N + n.
    N = tl.cast(R, tl.int64) * T
    part = WORK + R + n
    mk = tl.load(M + r * stride_mr + tt * stride_mt).to(tl.float32)
    if mk == 0.0:
        for k in tl.static_range(2 + NSTAT):
            tl.store(part + k * N, 0.0)
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

    x_ptr = X + r * stride_xr + tt * stride_xt
    m, s, t = _online_lse_pass(x_ptr, V, inv_t, HAS_TEMP, True, BLOCK_V)
    log_s = tl.log(s)
    lse = _lse(m, log_s)
    ent = log_s - t / s
    label = tl.load(LABELS + r * stride_lr + tt * stride_lt).to(tl.int64)
    z_label = tl.load(x_ptr + label).to(tl.float32)
    if HAS_TEMP:
        z_label = z_label * inv_t
    logp = z_label - lse

    old = tl.load(OLD + r * stride_or + tt * stride_ot).to(tl.float32)
    if SEQ:
        tl.store(LOGP_OUT + n, logp)
        loss = tl.zeros((), tl.float32)
        g = tl.zeros((), tl.float32)
        clipped = tl.zeros((), tl.float32)
        capped = tl.zeros((), tl.float32)
    else:
        adv = tl.load(ADV + r * stride_ar + tt * stride_at).to(tl.float32)
        loss, g, clipped, capped = policy_token_loss(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
        if HAS_ISW:
            isw = tl.load(ISW + r * stride_ir + tt * stride_it).to(tl.float32)
            loss = loss * isw
            g = g * isw
    kl = tl.zeros((), tl.float32)
    if HAS_REF:
        ref = tl.load(REF + r * stride_rr + tt * stride_rt).to(tl.float32)
        kl, dkl = kl_token(logp, ref, KL_EST)
        if KL_IN_LOSS:
            loss = loss + kl_coef * kl
            g = g + kl_coef * dkl
    if ENT_IN_LOSS:
        loss = loss - ent_coef * ent
    log_ratio = logp - old
    ratio = tl.exp(log_ratio)
    approx_kl = tl.exp(-log_ratio) - 1.0 + log_ratio  # k3 of (logp, old_logp), the reference's approx_kl

    tl.store(part, loss)
    tl.store(part + N, 1.0)
    stat = part + 2 * N
    tl.store(stat + CLIP_FRAC * N, clipped)
    tl.store(stat + RATIO_MEAN * N, ratio)
    tl.store(stat + APPROX_KL * N, approx_kl)
    tl.store(stat + KL * N, kl)
    tl.store(stat + ENTROPY * N, ent)
    tl.store(stat + DUAL_FRAC * N, capped)
    if NEED_GRAD:
        tl.store(LSE + n, lse)
        tl.store(G_LOGP + n, g)
        if ENT_IN_LOSS:
            tl.store(ENT + n, ent)
            tl.store(G_ENT + n, -ent_coef)


def _rows(t: torch.Tensor, shape) -> torch.Tensor:
    """A per-token tensor as ``[R, T]`` (a view: ``advantages`` ``[R, 1]`` is expanded, stride 0 along T)."""
    return t if t.shape == shape else t.expand(shape)


def fused_forward(
    logits3: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
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
    agg: str,
    counts: tuple,
    need_grad: bool,
    importance_sampling_level: str = "token",
) -> dict:
    """Launch the statistics pass over ``logits3[R, T, V]`` (last dimension contiguous) and the finalize.

    Per-token inputs are ``[R, T]`` with any strides; ``counts`` = ``(num_tokens, num_seqs, loss_scale)`` as
    floats (0 = from the batch). Returns ``loss`` (float32, 0-d), ``stats`` (float32 ``[NSTAT]`` in slot order),
    ``work`` (the workspace; ``f_r`` in its first ``R`` entries) and, with ``need_grad``, the per-token
    ``lse``, ``ent``, ``g_logp``, ``g_ent`` (``ent`` / ``g_ent`` None when the entropy is not in the loss).
    """
    rows, steps, vocab = logits3.shape
    n = rows * steps
    dev = logits3.device
    ent_in_loss = entropy_coef != 0.0
    work = torch.empty(rows + (2 + NUM_STATS) * n, dtype=torch.float32, device=dev)
    out = {"loss": torch.empty((), dtype=torch.float32, device=dev),
           "stats": torch.empty(NUM_STATS, dtype=torch.float32, device=dev), "work": work,
           "lse": None, "ent": None, "g_logp": None, "g_ent": None}
    if need_grad:
        per_token = torch.empty((4 if ent_in_loss else 2, n), dtype=torch.float32, device=dev).unbind(0)
        out.update(zip(("lse", "g_logp", "ent", "g_ent"), per_token))
    sequence_level = importance_sampling_level == "sequence"
    logp_out = torch.empty(n, dtype=torch.float32, device=dev) if sequence_level else work
    if n:
        inv_t, has_temp = _inv_temperature(temperature)
        dummy = work
        per_token_inputs = []
        for t in (labels, old_logp, advantages, mask, ref_logp, is_weights):
            per_token_inputs += (work, 0, 0) if t is None else (t, t.stride(0), t.stride(1))
        _ppo_fwd_kernel[(n,)](
            logits3, *_strides(logits3), *per_token_inputs, work,
            *(dummy if out[k] is None else out[k] for k in ("lse", "ent", "g_logp", "g_ent")), logp_out,
            rows, steps, vocab, inv_t, clip_low, clip_high, dual_clip or 0.0, kl_coef, entropy_coef,
            HAS_TEMP=has_temp, HAS_REF=ref_logp is not None,
            KL_IN_LOSS=ref_logp is not None and kl_coef != 0.0, KL_EST=ESTIMATOR_CODES[kl_estimator],
            HAS_ISW=is_weights is not None, HAS_DUAL=dual_clip is not None, ENT_IN_LOSS=ent_in_loss,
            NEED_GRAD=need_grad, SEQ=sequence_level, **forward_config(vocab),
        )
        if sequence_level:  # GSPO: the policy terms at each row's ratio, added to the partials written above
            launch_sequence_policy(logp_out.view(rows, steps), old_logp, advantages, is_weights, mask, work,
                                   out["g_logp"], clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                   store_grad=need_grad, accumulate=True,
                                   slots=(CLIP_FRAC.value, RATIO_MEAN.value, DUAL_FRAC.value, -1))
    launch_finalize(work, out["loss"], out["stats"], rows, steps, n, steps, agg, counts, NUM_STATS, tile=FINAL_TILE,
                    block_p=FINAL_STAT_BLOCK, num_warps=FINAL_WARPS)
    return out


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


# Buffers an in-place call filled with gradients: base tensor -> its version counter right after. Reading such a
# buffer again as logits (a second call on the same logits) would be silently wrong, so it is refused.
_OVERWRITTEN = WeakIdKeyDictionary()


def _base(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._is_view() else t


def _check_not_overwritten(logits3: torch.Tensor) -> None:
    base = _base(logits3)
    if _OVERWRITTEN.get(base) == base._version:
        raise ValueError(
            "logits: expected logits, got a buffer that holds the gradient written by an earlier "
            "fused_ppo_loss(inplace_grad=True) call; recompute the logits, or pass inplace_grad=False to keep them"
        )


def _can_write_gradient_inplace(logits3: torch.Tensor) -> bool:
    """Whether the gradient may overwrite ``logits3`` (see ``fused_ppo_loss``); host-side metadata checks only."""
    if logits3.dtype == torch.float16:
        return False  # the upstream gradient (loss scale) must be applied before rounding to fp16
    if _base(logits3).is_leaf:
        return False  # the leaf's data would be overwritten and its .grad would alias it
    return not _has_internal_overlap(logits3)


class _FusedPPOLossFunction(torch.autograd.Function):
    # The constants (labels, per-token tensors, options) travel in a dict: autograd does not track them, so the
    # loss requires grad only through the logits, with no detach.
    @staticmethod
    def forward(ctx, logits3, inplace_grad, kwargs):
        res = fused_forward(logits3, need_grad=True, **kwargs)
        labels, temperature = kwargs["labels"], kwargs["temperature"]
        steps = logits3.shape[1]
        grad_args = (labels, res["lse"], res["ent"], res["g_logp"], res["g_ent"])
        if inplace_grad:
            # The gradient (upstream 1) overwrites the logits now; the backward only rescales it (rarely).
            launch_logits_grad(logits3, logits3, *grad_args, None, temperature, t_inner=steps, row_scale=res["work"])
            # The logits changed: any other autograd node that saved them (or a view) for its backward now
            # raises autograd's "modified by an inplace operation" error instead of using the gradient as logits.
            # The buffer is kept on ctx, not saved, so this node's own backward does not trip that check.
            torch.autograd.graph.increment_version(logits3)
            base = _base(logits3)
            _OVERWRITTEN[base] = base._version
            ctx.grad_buffer = logits3
            ctx.backward_done = False
        else:
            ctx.save_for_backward(logits3, res["work"], *grad_args[1:])
            ctx.labels = labels
        ctx.inplace_grad = inplace_grad
        ctx.temperature = temperature
        ctx.steps = steps
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zeros for them in the backward
        stats = res["stats"].unbind(0)
        ctx.mark_non_differentiable(*stats)
        return (res["loss"], *stats)

    @staticmethod
    @first_order_only
    def backward(ctx, g_loss, *_g_stats):
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
            if g_loss is None:
                return None, None, None
            # Rescales only when the upstream gradient is not 1, decided on the device (no sync).
            launch_scale_rows(grad, g_loss, t_inner=ctx.steps)
            # Detached: the buffer is the logits tensor itself, which requires grad; a gradient handed out must not
            # (a hook or autograd.grad caller would get a tensor that refuses in-place updates).
            return grad.detach(), None, None
        if g_loss is None:
            return None, None, None
        logits3, work, lse, ent, g_logp, g_ent = ctx.saved_tensors
        grad = torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)
        launch_logits_grad(
            logits3, grad, ctx.labels, lse, ent, g_logp, g_ent, g_loss, ctx.temperature, t_inner=ctx.steps,
            row_scale=work,
        )
        return grad, None, None


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
    """``logits[R, T, V]`` -> policy loss + ``kl_coef * agg(kl)`` - ``entropy_coef * agg(entropy)``, and stats.

    Same signature and numbers as ``rlhf_fast.reference.losses.fused_ppo_loss``. Per-token tensors are
    ``[R, T]`` with any strides (``advantages`` may be ``[R]``, or an expanded ``[R] -> [R, T]`` view; the mask
    bool, int or float): they are read in place, never copied. Overrides are best passed as numbers
    (``rlhf_fast.ops`` does): a tensor is read here, a device sync. Differentiable with respect to ``logits``
    only, first order only (double backward raises).

    With ``inplace_grad=False`` the logits are never written; the gradient is computed in the backward into a
    fresh buffer, with the upstream gradient applied in float32 before rounding to the logits dtype.

    With ``inplace_grad=True`` (the fast path: no ``[R, T, V]`` allocation) and logits that require grad, the
    gradient of the loss (upstream 1) is computed here and written over ``logits``; the backward returns that
    buffer, rescaled in place when the upstream gradient is not 1. The logits' autograd version counter is
    bumped, so another node that saved ``logits`` (or a view of its storage) for its own backward raises
    autograd's "modified by an inplace operation" error rather than using the gradient as logits; pass
    ``inplace_grad=False`` then. The node supports a single backward: a second one (``retain_graph=True``)
    raises, and so does a second call on the overwritten buffer (through any view of it) until new values are
    written into it. The out-of-place path is taken instead, whatever ``inplace_grad`` says, for

    - float16 logits: the gradient would be rounded to fp16 before a loss scale (GradScaler) multiplies it, so
      small entries would flush to zero. bfloat16 and float32 keep the in-place path: they have float32's
      exponent range, so rounding before the scale loses nothing but the usual relative precision;
    - leaf logits (or views of a leaf): the leaf's data would be overwritten and its ``.grad`` would alias it;
    - logits whose elements overlap in memory (e.g. an ``expand``-ed view): several rows would write one place.
    """
    rows, steps = old_logp.shape
    shape = old_logp.shape
    vocab = logits.shape[-1]
    logits3 = logits if logits.shape == (rows, steps, vocab) else logits.reshape(rows, steps, vocab)
    if logits3.stride(-1) != 1:
        logits3 = logits3.contiguous()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    kwargs = dict(
        labels=_rows(labels, shape),
        old_logp=old_logp,
        advantages=_rows(advantages, shape),
        mask=_rows(mask, shape),
        ref_logp=None if ref_logp is None else _rows(ref_logp, shape),
        is_weights=None if is_weights is None else _rows(is_weights, shape),
        kl_coef=float(kl_coef),
        kl_estimator=kl_estimator,
        entropy_coef=float(entropy_coef),
        temperature=float(temperature),
        clip_low=float(clip_low),
        clip_high=float(clip_low if clip_high is None else clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip),
        agg=agg,
        counts=_check_agg(agg, num_tokens, num_seqs, loss_scale),
        importance_sampling_level="sequence" if _sequence_level(importance_sampling_level) else "token",
    )
    _check_not_overwritten(logits3)
    if torch.is_grad_enabled() and logits.requires_grad:
        inplace = bool(inplace_grad) and _can_write_gradient_inplace(logits3)
        outs = _FusedPPOLossFunction.apply(logits3, inplace, kwargs)
    else:
        res = fused_forward(logits3, need_grad=False, **kwargs)
        outs = (res["loss"], *res["stats"].unbind(0))
    loss, clip_frac, ratio_mean, approx_kl, kl, entropy, dual_frac = outs
    stats = {"clip_frac": clip_frac, "approx_kl": approx_kl, "ratio_mean": ratio_mean}
    if dual_clip is not None:
        stats["dual_clip_frac"] = dual_frac
    stats["kl"] = kl  # 0 without ref_logp (every token's term is 0)
    stats["entropy"] = entropy
    return loss, stats


KERNELS = {"fused_ppo_loss": fused_ppo_loss}
