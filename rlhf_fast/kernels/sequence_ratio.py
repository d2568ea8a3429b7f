"""The PPO policy loss with a sequence-level importance ratio (GSPO), one Triton program per row.

With ``importance_sampling_level="sequence"`` every valid token of row ``r`` uses the row's ratio
``s_r = exp(mean_t(logp - old_logp))`` over its ``n_r`` valid tokens (Zheng et al. 2025). A token's loss then
depends on its whole row, so this kernel works row by row in three sweeps over the row's tokens:

1. the mean log-ratio ``mean_t(logp - old_logp)``;
2. each token's clipped loss at the row's ratio (``policy_token_loss`` with log-ratio ``seq``, the same math and
   tie-breaking as the token-level kernels), written as per-token partials of the finalize workspace
   (``losses._finalize_kernel`` with ``G = T``, ``P = R * T``), and the row sum of ``dl/dseq`` (times
   ``is_weights``);
3. with a gradient, ``dl/dlogp_t = sum_t' dl_t'/dseq / n_r`` on every valid token (the mean passes it on), the
   per-token factor the backward kernels multiply by the finalize's row factor ``f_r``.

Workspace (float32, ``N = R * T``, the layout of ``fused_loss.py``): ``[f: R] [l * m: N] [m: N] [stat k: N]...``.
``ACCUMULATE`` adds the loss and the gradient to what is there (the fused loss from logits has written its KL and
entropy terms first) instead of storing them. The statistic slots are arguments: the two callers order them
differently; ``APPROX_SLOT < 0`` leaves ``approx_kl`` (the per-token k3, whatever the ratio level) to the caller.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._ppo_math import policy_token_loss

ROW_BLOCK = 1024  # tokens per sweep step


@triton.jit
def _row_tokens(M, s_m_r, s_m_t, r, cols, T):
    inside = cols < T
    m = tl.load(M + r * s_m_r + cols * s_m_t, mask=inside, other=0.0).to(tl.float32)
    return inside, inside & (m != 0.0)


@triton.jit
def sequence_policy_kernel(
    LOGP, s_lp_r, s_lp_t,
    OLD, s_old_r, s_old_t,
    ADV, s_adv_r, s_adv_t,
    ISW, s_isw_r, s_isw_t,
    M, s_m_r, s_m_t,
    WORK,  # float32 finalize workspace with per-token partials (module docstring)
    GRAD,  # float32 [R * T]: dl/dlogp (times is_weights), unweighted by the agg mode; written with STORE_GRAD
    R, T, clip_low, clip_high, dual_clip,
    HAS_DUAL: tl.constexpr, HAS_ISW: tl.constexpr, STORE_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr,
    CLIP_SLOT: tl.constexpr, RATIO_SLOT: tl.constexpr, DUAL_SLOT: tl.constexpr, APPROX_SLOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    N = tl.cast(R, tl.int64) * T
    lo, hi, cap = tl.cast(clip_low, tl.float32), tl.cast(clip_high, tl.float32), tl.cast(dual_clip, tl.float32)

    # 1. the row's mean log-ratio over its valid tokens
    total = tl.zeros((BLOCK_T,), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        inside, valid = _row_tokens(M, s_m_r, s_m_t, r, cols, T)
        logp = tl.load(LOGP + r * s_lp_r + cols * s_lp_t, mask=valid, other=0.0).to(tl.float32)
        old = tl.load(OLD + r * s_old_r + cols * s_old_t, mask=valid, other=0.0).to(tl.float32)
        total += tl.where(valid, logp - old, 0.0)
        count += tl.where(valid, 1.0, 0.0)
    n_valid = tl.maximum(tl.sum(count, axis=0), 1.0)
    seq = tl.sum(total, axis=0) / n_valid

    # 2. per-token losses and statistics at the row's ratio; the row sum of dl/dseq
    g_total = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        inside, valid = _row_tokens(M, s_m_r, s_m_t, r, cols, T)
        adv = tl.load(ADV + r * s_adv_r + cols * s_adv_t, mask=valid, other=0.0).to(tl.float32)
        seq_t = tl.zeros((BLOCK_T,), tl.float32) + seq
        loss, g, clipped, capped = policy_token_loss(seq_t, tl.zeros_like(seq_t), adv, lo, hi, cap, HAS_DUAL)
        if HAS_ISW:
            isw = tl.load(ISW + r * s_isw_r + cols * s_isw_t, mask=valid, other=0.0).to(tl.float32)
            loss = loss * isw
            g = g * isw
        n = r * T + cols
        part = WORK + R + n
        loss = tl.where(valid, loss, 0.0)
        if ACCUMULATE:
            tl.store(part, tl.load(part, mask=inside, other=0.0) + loss, mask=inside)
        else:
            tl.store(part, loss, mask=inside)
            tl.store(part + N, tl.where(valid, 1.0, 0.0), mask=inside)
        stat = part + 2 * N
        tl.store(stat + CLIP_SLOT * N, tl.where(valid, clipped, 0.0), mask=inside)
        tl.store(stat + RATIO_SLOT * N, tl.where(valid, tl.exp(seq_t), 0.0), mask=inside)
        tl.store(stat + DUAL_SLOT * N, tl.where(valid, capped, 0.0), mask=inside)
        if APPROX_SLOT >= 0:
            logp = tl.load(LOGP + r * s_lp_r + cols * s_lp_t, mask=valid, other=0.0).to(tl.float32)
            old = tl.load(OLD + r * s_old_r + cols * s_old_t, mask=valid, other=0.0).to(tl.float32)
            log_ratio = logp - old
            tl.store(stat + APPROX_SLOT * N, tl.where(valid, tl.exp(-log_ratio) - 1.0 + log_ratio, 0.0), mask=inside)
        g_total += tl.where(valid, g, 0.0)

    # 3. the mean hands the row's gradient to each valid token in equal shares
    if STORE_GRAD:
        share = tl.sum(g_total, axis=0) / n_valid
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            inside, valid = _row_tokens(M, s_m_r, s_m_t, r, cols, T)
            g = tl.where(valid, share, 0.0)
            if ACCUMULATE:
                g = g + tl.load(GRAD + r * T + cols, mask=inside, other=0.0)
            tl.store(GRAD + r * T + cols, g, mask=inside)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_sequence_policy(logp, old_logp, advantages, is_weights, mask, work, grad, *, clip_low: float,
                           clip_high: float, dual_clip, store_grad: bool, accumulate: bool, slots: tuple) -> None:
    """One program per row of the ``[R, T]`` per-token tensors (any strides; ``is_weights`` may be None);
    ``slots`` = ``(clip, ratio, dual, approx)`` statistic slots of ``work`` (approx < 0: not written)."""
    R, T = old_logp.shape
    if R == 0 or T == 0:
        return
    isw = is_weights if is_weights is not None else old_logp
    clip_slot, ratio_slot, dual_slot, approx_slot = slots
    sequence_policy_kernel[(R,)](
        logp, logp.stride(0), logp.stride(1), old_logp, old_logp.stride(0), old_logp.stride(1),
        advantages, advantages.stride(0), advantages.stride(1), isw, isw.stride(0), isw.stride(1),
        mask, mask.stride(0), mask.stride(1), work, grad if grad is not None else work,
        R, T, clip_low, clip_high, dual_clip if dual_clip is not None else 0.0,
        HAS_DUAL=dual_clip is not None, HAS_ISW=is_weights is not None, STORE_GRAD=store_grad,
        ACCUMULATE=accumulate, CLIP_SLOT=clip_slot, RATIO_SLOT=ratio_slot, DUAL_SLOT=dual_slot,
        APPROX_SLOT=approx_slot, BLOCK_T=min(_next_pow2(T), ROW_BLOCK),
    )
