"""Clipped PPO policy and value losses: three Triton launches per forward + backward, no other device work.

Layout: per-token tensors are ``[R, T]`` with any strides (``advantages`` may be an expanded view of per-sequence
values, stride 0 along T: it is read through its strides, never copied).

1. The forward kernel works on ``[BLOCK_R, BLOCK_T]`` tiles. Each tile writes, for each of its rows, the masked sums
   ``sum(l)`` and ``sum(m)`` over its columns (the row partials), one partial sum per statistic, and, when a
   gradient is needed, the unweighted per-token factor ``dl/dx * m`` (times ``is_weights``).
2. A single-program finalize kernel adds the partials in a fixed order, applies the ``agg`` mode and writes the
   loss, the statistics and each row's gradient factor ``f_r`` (``loss = sum_r f_r * sum_t l * m``; one value
   for every row except in ``seq-mean-token-mean``).
3. The backward kernel writes ``dl/dx * m * f_r * upstream``, reading the upstream gradient on the device.

With ``importance_sampling_level="sequence"`` (GSPO) step 1 is ``sequence_ratio.py``'s row kernel instead, writing
one partial per token (``G = T``, ``P = R * T``); steps 2 and 3 are the same.

So two calls give bitwise-equal losses and statistics, and since the tile shape depends on ``T`` only and each
token's loss and factor depend only on that token, the stored per-token factors are batch invariant. Count
overrides arrive as Python floats (``rlhf_fast.ops`` reads tensor overrides once, while validating): nothing
here syncs. Masked positions are excluded with a select, not a multiply, so non-finite values under the mask
never leak into the loss, the statistics or the gradient (the reference would give nan there).

Float32 workspace of one call (``G`` column tiles, ``P`` programs, ``S`` statistics):
``[f: R] [row loss sums: R * G] [row token counts: R * G] [statistic partials: S * P]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.losses import AGG_MODES
from ._autograd import first_order_only
from ._ppo_math import kl_token, policy_token_loss
from .sequence_ratio import launch_sequence_policy

TILE = 1024  # tokens per program (forward and backward), and row partials per finalize step
STAT_BLOCK = 256  # statistic partials per finalize step

# agg modes as the finalize kernel's AGG constexpr.
TOKEN_MEAN = tl.constexpr(0)
TOKEN_SUM = tl.constexpr(1)
SEQ_SUM = tl.constexpr(2)
SEQ_MEAN = tl.constexpr(3)
SEQ_SUM_NORM = tl.constexpr(4)
AGG_CODES = {"token-mean": 0, "token-sum": 1, "seq-mean-token-sum": 2, "seq-mean-token-mean": 3,
             "seq-mean-token-sum-norm": 4}
assert set(AGG_CODES) == set(AGG_MODES)

# Statistic slots, in the order the outputs come back after the loss.
POLICY_STATS = 4  # clip_frac, approx_kl, ratio_mean, dual_clip_frac
VALUE_STATS = 2  # clip_frac, value_mean


@triton.jit
def _tile(pid_r, pid_t, R, T, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    inside = (rows[:, None] < R) & (cols[None, :] < T)
    return rows, cols, inside


@triton.jit
def _load(ptr, rows, cols, stride_r, stride_t, inside):
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_t, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _store_row_partials(work_ptr, R, rows, valid, loss):
    """Row partials of this tile: the masked loss sum and the valid-token count of each row over its columns."""
    n_cols = tl.num_programs(1)
    r64 = tl.cast(R, tl.int64)
    at = rows * n_cols + tl.program_id(1)
    tl.store(work_ptr + r64 + at, tl.sum(tl.where(valid, loss, 0.0), axis=1), mask=rows < R)
    tl.store(work_ptr + r64 + r64 * n_cols + at, tl.sum(tl.where(valid, 1.0, 0.0), axis=1), mask=rows < R)


@triton.jit
def _stat_partials_ptr(work_ptr, R):
    """Where slot 0 of this program's statistic partials goes; slot k is ``P`` entries further."""
    n_cols = tl.num_programs(1)
    r64 = tl.cast(R, tl.int64)
    pid = tl.program_id(0).to(tl.int64) * n_cols + tl.program_id(1)
    return work_ptr + r64 + 2 * r64 * n_cols + pid


@triton.jit
def _masked_sum(x, valid):
    return tl.sum(tl.sum(tl.where(valid, x, 0.0), axis=1), axis=0)


@triton.jit
def _policy_fwd_kernel(
    logp_ptr, s_lp_r, s_lp_t,
    old_ptr, s_old_r, s_old_t,
    adv_ptr, s_adv_r, s_adv_t,
    isw_ptr, s_isw_r, s_isw_t,
    mask_ptr, s_m_r, s_m_t,
    gfac_ptr,  # float32 [R, T] contiguous: dl/dlogp * m * is_weights (unweighted by the agg mode)
    work_ptr,  # float32 workspace (module docstring)
    R, T, clip_low, clip_high, dual_clip,
    HAS_DUAL: tl.constexpr, HAS_ISW: tl.constexpr, STORE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r, pid_t = tl.program_id(0), tl.program_id(1)
    rows, cols, inside = _tile(pid_r, pid_t, R, T, BLOCK_R, BLOCK_T)
    logp = _load(logp_ptr, rows, cols, s_lp_r, s_lp_t, inside)
    old = _load(old_ptr, rows, cols, s_old_r, s_old_t, inside)
    adv = _load(adv_ptr, rows, cols, s_adv_r, s_adv_t, inside)
    m = _load(mask_ptr, rows, cols, s_m_r, s_m_t, inside)
    valid = inside & (m != 0.0)

    # Explicit fp32: Inductor passes Python floats as fp64, eager Triton as fp32.
    lo, hi, cap = tl.cast(clip_low, tl.float32), tl.cast(clip_high, tl.float32), tl.cast(dual_clip, tl.float32)
    loss, dloss, clipped, capped = policy_token_loss(logp, old, adv, lo, hi, cap, HAS_DUAL)
    if HAS_ISW:
        isw = _load(isw_ptr, rows, cols, s_isw_r, s_isw_t, inside)
        loss = loss * isw
        dloss = dloss * isw
    if STORE_GRAD:
        tl.store(gfac_ptr + rows[:, None] * T + cols[None, :], tl.where(valid, dloss, 0.0), mask=inside)
    ratio = tl.exp(logp - old)
    kl, _ = kl_token(logp, old, 3)

    _store_row_partials(work_ptr, R, rows, valid, loss)
    stat = _stat_partials_ptr(work_ptr, R)
    P = tl.num_programs(0) * tl.num_programs(1)
    tl.store(stat, _masked_sum(clipped, valid))
    tl.store(stat + P, _masked_sum(kl, valid))
    tl.store(stat + 2 * P, _masked_sum(ratio, valid))
    tl.store(stat + 3 * P, _masked_sum(capped, valid))


@triton.jit
def _value_fwd_kernel(
    v_ptr, s_v_r, s_v_t,
    old_ptr, s_old_r, s_old_t,
    ret_ptr, s_ret_r, s_ret_t,
    mask_ptr, s_m_r, s_m_t,
    gfac_ptr, work_ptr,
    R, T, clip,
    HAS_CLIP: tl.constexpr, STORE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r, pid_t = tl.program_id(0), tl.program_id(1)
    rows, cols, inside = _tile(pid_r, pid_t, R, T, BLOCK_R, BLOCK_T)
    v = _load(v_ptr, rows, cols, s_v_r, s_v_t, inside)
    ret = _load(ret_ptr, rows, cols, s_ret_r, s_ret_t, inside)
    m = _load(mask_ptr, rows, cols, s_m_r, s_m_t, inside)
    valid = inside & (m != 0.0)

    diff = v - ret
    unclipped = diff * diff
    g_unclipped = 2.0 * diff
    if HAS_CLIP:
        old = _load(old_ptr, rows, cols, s_old_r, s_old_t, inside)
        c = tl.cast(clip, tl.float32)
        step = v - old
        v_clipped = old + tl.minimum(tl.maximum(step, -c), c)
        diff_c = v_clipped - ret
        clipped_term = diff_c * diff_c
        # torch.clamp passes the gradient on the closed interval; torch.maximum splits it at ties.
        g_clipped = tl.where((step >= -c) & (step <= c), 2.0 * diff_c, 0.0)
        loss = 0.5 * tl.maximum(unclipped, clipped_term)
        dloss = 0.5 * tl.where(
            unclipped > clipped_term,
            g_unclipped,
            tl.where(clipped_term > unclipped, g_clipped, 0.5 * g_unclipped + 0.5 * g_clipped),
        )
        clipped = tl.where(clipped_term > unclipped, 1.0, 0.0)
    else:
        loss = 0.5 * unclipped
        dloss = 0.5 * g_unclipped
        clipped = tl.zeros_like(loss)
    if STORE_GRAD:
        tl.store(gfac_ptr + rows[:, None] * T + cols[None, :], tl.where(valid, dloss, 0.0), mask=inside)

    _store_row_partials(work_ptr, R, rows, valid, loss)
    stat = _stat_partials_ptr(work_ptr, R)
    P = tl.num_programs(0) * tl.num_programs(1)
    tl.store(stat, _masked_sum(clipped, valid))
    tl.store(stat + P, _masked_sum(v, valid))


@triton.jit
def _row_totals(work_ptr, r64, G, rows, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Loss sum and token count of ``rows`` from their row partials, added in a fixed order."""
    loss = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
    count = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
        at = rows[:, None] * G + cols[None, :]
        inside = (rows[:, None] < r64) & (cols[None, :] < G)
        loss += tl.load(work_ptr + r64 + at, mask=inside, other=0.0)
        count += tl.load(work_ptr + r64 + r64 * G + at, mask=inside, other=0.0)
    return tl.sum(loss, axis=1), tl.sum(count, axis=1)


@triton.jit
def _finalize_kernel(
    work_ptr,  # float32 workspace (module docstring); f_r is written into its first R entries
    loss_ptr,  # float32 0-d: the loss (its own buffer: the loss is returned as a tensor of its own, not a view)
    stats_ptr,  # float32 [NSTAT]: the statistics (masked means)
    R, G, P, num_tokens, num_seqs, loss_scale,  # overrides: 0 = count from the batch
    AGG: tl.constexpr, NSTAT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    r64 = tl.cast(R, tl.int64)
    # Per-row totals; every mode needs only these four sums over the rows.
    loss_acc = tl.zeros((BLOCK_R,), tl.float32)
    mean_acc = tl.zeros((BLOCK_R,), tl.float32)  # row means (a masked row's sum is 0, so is its mean)
    token_acc = tl.zeros((BLOCK_R,), tl.float32)
    seq_acc = tl.zeros((BLOCK_R,), tl.float32)  # rows with at least one valid token
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_loss, row_count = _row_totals(work_ptr, r64, G, rows, BLOCK_R, BLOCK_G)
        loss_acc += row_loss
        mean_acc += row_loss / tl.maximum(row_count, 1.0)
        token_acc += row_count
        seq_acc += tl.where(row_count > 0.0, 1.0, 0.0)
    tokens = tl.sum(token_acc, axis=0)

    # Statistics: masked means over every valid token.
    NSTAT_P2: tl.constexpr = triton.next_power_of_2(NSTAT)
    slots = tl.arange(0, NSTAT_P2).to(tl.int64)
    in_slot = slots < NSTAT
    stat_ptr = work_ptr + r64 + 2 * r64 * G
    acc = tl.zeros((NSTAT_P2, BLOCK_P), tl.float32)
    for start in range(0, P, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P).to(tl.int64)
        inside = in_slot[:, None] & (idx[None, :] < P)
        acc += tl.load(stat_ptr + slots[:, None] * P + idx[None, :], mask=inside, other=0.0)
    tl.store(stats_ptr + slots, tl.sum(acc, axis=1) / tl.maximum(tokens, 1.0), mask=in_slot)

    # Explicit fp32 overrides (Inductor passes Python floats as fp64). A count the batch gives is at least 1.
    n_tok = tl.cast(num_tokens, tl.float32)
    n_seq = tl.cast(num_seqs, tl.float32)
    if AGG == TOKEN_MEAN:
        denom = tl.where(n_tok > 0.0, n_tok, tl.maximum(tokens, 1.0))
        loss = tl.sum(loss_acc, axis=0) / denom
    elif AGG == TOKEN_SUM:
        denom = 1.0
        loss = tl.sum(loss_acc, axis=0)
    else:
        denom = tl.where(n_seq > 0.0, n_seq, tl.maximum(tl.sum(seq_acc, axis=0), 1.0))
        if AGG == SEQ_MEAN:
            loss = tl.sum(mean_acc, axis=0) / denom
        else:
            loss = tl.sum(loss_acc, axis=0) / denom
        if AGG == SEQ_SUM_NORM:
            norm = tl.cast(loss_scale, tl.float32)
            loss = loss / norm
            denom = denom * norm
    tl.store(loss_ptr, loss)

    # f_r: d loss / d (sum_t l * m of row r). Only seq-mean-token-mean differs per row: it recounts the row's
    # tokens from the same partials in the same order (bitwise the count above).
    scale = 1.0 / denom
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        if AGG == SEQ_MEAN:
            _, row_count = _row_totals(work_ptr, r64, G, rows, BLOCK_R, BLOCK_G)
            f = scale / tl.maximum(row_count, 1.0)
        else:
            f = tl.zeros((BLOCK_R,), tl.float32) + scale
        tl.store(work_ptr + rows, f, mask=rows < r64)


@triton.jit
def _backward_kernel(
    gfac_ptr,  # float32 [R, T] contiguous: dl/dx * m (* is_weights)
    f_ptr,  # float32 [R]: the finalize kernel's row factors
    g_ptr,  # the upstream gradient of the loss (0-d, any float dtype)
    out_ptr,  # [R, T] contiguous, the input's dtype
    R, T, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows, cols, inside = _tile(tl.program_id(0), tl.program_id(1), R, T, BLOCK_R, BLOCK_T)
    g = tl.load(g_ptr).to(tl.float32)
    f = tl.load(f_ptr + rows, mask=rows < R, other=0.0) * g
    at = rows[:, None] * T + cols[None, :]
    fac = tl.load(gfac_ptr + at, mask=inside, other=0.0)
    tl.store(out_ptr + at, (fac * f[:, None]).to(out_ptr.dtype.element_ty), mask=inside)


# Plain-int helpers: triton.cdiv / next_power_of_2 are constexpr functions now, several times slower on the host.
def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(R: int, T: int):
    block_t = min(_next_pow2(T), TILE)
    block_r = max(1, TILE // block_t)
    return block_r, block_t, _cdiv(R, block_r), _cdiv(T, block_t)


def _strides(t: torch.Tensor):
    return (t, t.stride(0), t.stride(1))


def launch_finalize(
    work: torch.Tensor, loss: torch.Tensor, stats: torch.Tensor, R: int, G: int, P: int, T: int, agg: str, counts,
    nstat: int, *, tile: int = TILE, block_p: int = STAT_BLOCK, num_warps: int = 4,
) -> None:
    """The single-program finalize over a workspace laid out as in the module docstring (``G`` row partials per
    row, ``P`` partials per statistic); ``counts`` = ``(num_tokens, num_seqs, loss_scale)`` floats, 0 = from the
    batch; ``T`` is the default ``seq-mean-token-sum-norm`` divisor. ``tile`` row partials and ``block_p`` partials
    per statistic per step (powers of two). Also the fused PPO loss's finalize (``fused_loss.py``: one partial per
    token, ``G = T`` and ``P = R * T``)."""
    num_tokens, num_seqs, loss_scale = counts
    block_g = min(_next_pow2(G), tile)
    _finalize_kernel[(1,)](
        work, loss, stats, R, G, P, num_tokens, num_seqs, loss_scale or float(max(T, 1)),
        AGG=AGG_CODES[agg], NSTAT=nstat, BLOCK_R=tile // block_g, BLOCK_G=block_g, BLOCK_P=block_p,
        num_warps=num_warps,
    )


def _count(value) -> float:
    """An override as the finalize kernel takes it: 0.0 = count from the batch. ``rlhf_fast.ops`` passes floats;
    a tensor from a direct caller is read here (one sync)."""
    return 0.0 if value is None else float(value)


class _Call:
    """One forward: tiles, the workspace and the gradient-factor buffer; ``finish`` runs the finalize kernel."""

    def __init__(self, ctx, x: torch.Tensor, nstat: int, need_grad: bool, per_token: bool = False):
        R, T = x.shape
        self.block_r, self.block_t, grid_r, grid_t = _tiles(R, T)
        self.grid = (grid_r, grid_t)
        self.nstat = nstat
        # From the caller: inside forward grad mode is always off, and needs_input_grad is True under no_grad too.
        self.store_grad = need_grad
        # per_token: one partial per token (G = T, P = R * T), the layout sequence_ratio.py writes
        self.partials = (T, R * T) if per_token else (grid_t, grid_r * grid_t)
        G, P = self.partials
        self.work = torch.empty(R + 2 * R * G + nstat * P, dtype=torch.float32, device=x.device)
        # Without a gradient to store the kernel never writes gfac: any float32 buffer will do.
        self.gfac = torch.empty((R, T), dtype=torch.float32, device=x.device) if self.store_grad else self.work

    def finish(self, ctx, x: torch.Tensor, agg: str, counts) -> tuple:
        R, T = x.shape
        loss = torch.empty((), dtype=torch.float32, device=x.device)
        stats = torch.empty(self.nstat, dtype=torch.float32, device=x.device)
        launch_finalize(self.work, loss, stats, R, *self.partials, T, agg, counts, self.nstat)
        if self.store_grad:
            ctx.save_for_backward(self.gfac, self.work)
            ctx.tiles = (self.block_r, self.block_t, self.grid)
            ctx.dtype = x.dtype
        ctx.store_grad = self.store_grad
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zeros for them in the backward
        stats = stats.unbind(0)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)


def _loss_backward(ctx, grad_loss, num_inputs: int):
    # Only the first input (logp or values) is differentiable; the others get None.
    if not ctx.store_grad or grad_loss is None:
        return (None,) * num_inputs
    gfac, work = ctx.saved_tensors
    block_r, block_t, grid = ctx.tiles
    R, T = gfac.shape
    grad = torch.empty((R, T), dtype=ctx.dtype, device=gfac.device)
    if grad.numel():
        _backward_kernel[grid](gfac, work, grad_loss, grad, R, T, BLOCK_R=block_r, BLOCK_T=block_t)
    return (grad,) + (None,) * (num_inputs - 1)


class _PolicyLoss(torch.autograd.Function):
    # The constants (old_logp, advantages, mask, is_weights) travel in a tuple: autograd does not track them,
    # so the loss requires grad only through logp, with no detach.
    @staticmethod
    def forward(ctx, logp, consts, need_grad, agg, counts, clip_low, clip_high, dual_clip, sequence_level):
        old_logp, advantages, mask, is_weights = consts
        call = _Call(ctx, logp, POLICY_STATS, need_grad, per_token=sequence_level)
        if sequence_level:  # GSPO: one program per row (sequence_ratio.py), then the same finalize and backward
            launch_sequence_policy(logp, old_logp, advantages, is_weights, mask, call.work,
                                   call.gfac if call.store_grad else None, clip_low=clip_low, clip_high=clip_high,
                                   dual_clip=dual_clip, store_grad=call.store_grad, accumulate=False,
                                   slots=(0, 2, 3, 1))
        elif logp.numel():
            isw = is_weights if is_weights is not None else logp
            _policy_fwd_kernel[call.grid](
                *_strides(logp), *_strides(old_logp), *_strides(advantages), *_strides(isw), *_strides(mask),
                call.gfac, call.work, *logp.shape, clip_low, clip_high, dual_clip if dual_clip is not None else 0.0,
                HAS_DUAL=dual_clip is not None, HAS_ISW=is_weights is not None, STORE_GRAD=call.store_grad,
                BLOCK_R=call.block_r, BLOCK_T=call.block_t,
            )
        return call.finish(ctx, logp, agg, counts)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *_):
        return _loss_backward(ctx, grad_loss, 9)


class _ValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, consts, need_grad, agg, counts, clip):
        old_values, returns, mask = consts
        call = _Call(ctx, values, VALUE_STATS, need_grad)
        if values.numel():
            _value_fwd_kernel[call.grid](
                *_strides(values), *_strides(old_values), *_strides(returns), *_strides(mask),
                call.gfac, call.work, *values.shape, clip if clip is not None else 0.0,
                HAS_CLIP=clip is not None, STORE_GRAD=call.store_grad, BLOCK_R=call.block_r, BLOCK_T=call.block_t,
            )
        return call.finish(ctx, values, agg, counts)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *_):
        return _loss_backward(ctx, grad_loss, 6)


def _sequence_level(level: str) -> bool:
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level: expected one of ['token', 'sequence'], got {level!r}")
    return level == "sequence"


def _needs_grad(x: torch.Tensor) -> bool:
    """Whether the forward must store gradient factors (no buffer under no_grad / inference_mode)."""
    return torch.is_grad_enabled() and x.requires_grad


def _check_rows(name: str, t: torch.Tensor, shape) -> None:
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} ([R, T]), got {tuple(t.shape)}")


def _check_agg(agg: str, num_tokens, num_seqs, loss_scale) -> tuple[float, float, float]:
    if agg not in AGG_CODES:
        raise ValueError(f"agg: expected one of {list(AGG_MODES)}, got {agg!r}")
    return _count(num_tokens), _count(num_seqs), _count(loss_scale)


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
    """Triton clipped PPO policy loss on ``[R, T]`` tensors (``advantages`` ``[R, T]`` or ``[R]``).

    Differentiable with respect to ``logp`` only (as docs/API.md specifies): ``old_logp``, ``advantages`` and
    ``is_weights`` are treated as constants even if they require grad. Overrides are best passed as numbers
    (``rlhf_fast.ops`` does): a tensor is read here, a device sync. ``importance_sampling_level="sequence"``
    (GSPO) runs the row kernel of ``sequence_ratio.py`` instead of the tiled forward.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if logp.dim() != 2:
        raise ValueError(f"logp: expected a 2-d tensor [R, T], got shape {tuple(logp.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand(logp.shape)
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask), ("is_weights", is_weights)):
        if t is not None:
            _check_rows(name, t, logp.shape)
    counts = _check_agg(agg, num_tokens, num_seqs, loss_scale)
    loss, clip_frac, approx_kl, ratio_mean, dual_frac = _PolicyLoss.apply(
        logp, (old_logp, advantages, mask, is_weights), _needs_grad(logp), agg, counts, float(clip_low),
        float(clip_high),
        None if dual_clip is None else float(dual_clip), _sequence_level(importance_sampling_level),
    )
    stats = {"clip_frac": clip_frac, "approx_kl": approx_kl, "ratio_mean": ratio_mean}
    if dual_clip is not None:
        stats["dual_clip_frac"] = dual_frac
    return loss, stats


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
    """Triton clipped value loss on ``[R, T]`` tensors; ``clip=None`` disables clipping.

    Differentiable with respect to ``values`` only; ``old_values`` and ``returns`` are constants.
    """
    if values.dim() != 2:
        raise ValueError(f"values: expected a 2-d tensor [R, T], got shape {tuple(values.shape)}")
    for name, t in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        _check_rows(name, t, values.shape)
    counts = _check_agg(agg, num_tokens, num_seqs, loss_scale)
    loss, clip_frac, value_mean = _ValueLoss.apply(
        values, (old_values, returns, mask), _needs_grad(values), agg, counts, None if clip is None else float(clip)
    )
    return loss, {"clip_frac": clip_frac, "value_mean": value_mean}


KERNELS = {"ppo_policy_loss": ppo_policy_loss, "ppo_value_loss": ppo_value_loss}
