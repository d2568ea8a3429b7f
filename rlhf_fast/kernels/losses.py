"""Clipped PPO policy and value losses: one forward and one backward Triton kernel each.

Layout: per-token tensors are ``[R, T]`` with any strides (``advantages`` may be an expanded view of per-sequence
values, stride 0 along T: it is read through its strides, never copied).

Every aggregation mode is ``loss = sum(l * w)`` with per-token weights ``w`` from
``rlhf_fast.kernels._weights.token_weights`` (computed once from the mask and the count overrides). The forward
kernel works on ``[BLOCK_R, BLOCK_T]`` tiles; each tile writes one partial sum per statistic, and a single-program
finalize kernel adds the partials in a fixed order, so two calls give bitwise-equal losses and statistics. The
tile shape depends on ``T`` only, and each token's loss and gradient depend only on that token, so per-token
terms are batch invariant.

The forward also writes ``dl/dx * w`` (times ``is_weights``) for each token when a gradient is needed; the
backward kernel multiplies it by the upstream gradient. Masked positions are excluded with a select, not a
multiply, so non-finite values under the mask never leak into the loss, the statistics or the gradient (the
reference would give nan there).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only
from ._ppo_math import kl_token, policy_token_loss
from ._weights import token_weights

TILE = 1024  # tokens per program
NSTAT = 8  # partial-sum slots per program (padded to a power of two)
FINAL_BLOCK = 256

# Partial-sum slots.
_LOSS, _COUNT, _CLIP, _KL, _RATIO, _DUAL = 0, 1, 2, 3, 4, 5  # policy
_VCLIP, _VALUE = 2, 3  # value (loss and count as above)


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
def _policy_fwd_kernel(
    logp_ptr, s_lp_r, s_lp_t,
    old_ptr, s_old_r, s_old_t,
    adv_ptr, s_adv_r, s_adv_t,
    isw_ptr, s_isw_r, s_isw_t,
    mask_ptr, s_m_r, s_m_t,
    w_ptr,  # float32 [R, T] contiguous
    gfac_ptr,  # float32 [R, T] contiguous: dl/dlogp * w * is_weights
    partial_ptr,  # float32 [NSTAT, P]
    R, T, P, clip_low, clip_high, dual_clip,
    HAS_DUAL: tl.constexpr, HAS_ISW: tl.constexpr, STORE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r, pid_t = tl.program_id(0), tl.program_id(1)
    rows, cols, inside = _tile(pid_r, pid_t, R, T, BLOCK_R, BLOCK_T)
    logp = _load(logp_ptr, rows, cols, s_lp_r, s_lp_t, inside)
    old = _load(old_ptr, rows, cols, s_old_r, s_old_t, inside)
    adv = _load(adv_ptr, rows, cols, s_adv_r, s_adv_t, inside)
    m = _load(mask_ptr, rows, cols, s_m_r, s_m_t, inside)
    flat = rows[:, None] * T + cols[None, :]
    w = tl.load(w_ptr + flat, mask=inside, other=0.0)
    valid = inside & (m != 0.0)

    # Explicit fp32: Inductor passes Python floats as fp64, eager Triton as fp32.
    lo, hi, cap = tl.cast(clip_low, tl.float32), tl.cast(clip_high, tl.float32), tl.cast(dual_clip, tl.float32)
    loss, dloss, clipped, capped = policy_token_loss(logp, old, adv, lo, hi, cap, HAS_DUAL)
    if HAS_ISW:
        isw = _load(isw_ptr, rows, cols, s_isw_r, s_isw_t, inside)
        loss = loss * isw
        dloss = dloss * isw
    if STORE_GRAD:
        tl.store(gfac_ptr + flat, tl.where(valid, dloss * w, 0.0), mask=inside)
    ratio = tl.exp(logp - old)
    kl, _ = kl_token(logp, old, 3)

    pid = pid_r.to(tl.int64) * tl.num_programs(1) + pid_t
    tl.store(partial_ptr + 0 * P + pid, tl.sum(tl.sum(tl.where(valid, loss * w, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 1 * P + pid, tl.sum(tl.sum(tl.where(valid, m, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 2 * P + pid, tl.sum(tl.sum(tl.where(valid, clipped * m, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 3 * P + pid, tl.sum(tl.sum(tl.where(valid, kl * m, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 4 * P + pid, tl.sum(tl.sum(tl.where(valid, ratio * m, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 5 * P + pid, tl.sum(tl.sum(tl.where(valid, capped * m, 0.0), axis=1), axis=0))


@triton.jit
def _value_fwd_kernel(
    v_ptr, s_v_r, s_v_t,
    old_ptr, s_old_r, s_old_t,
    ret_ptr, s_ret_r, s_ret_t,
    mask_ptr, s_m_r, s_m_t,
    w_ptr, gfac_ptr, partial_ptr,
    R, T, P, clip,
    HAS_CLIP: tl.constexpr, STORE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r, pid_t = tl.program_id(0), tl.program_id(1)
    rows, cols, inside = _tile(pid_r, pid_t, R, T, BLOCK_R, BLOCK_T)
    v = _load(v_ptr, rows, cols, s_v_r, s_v_t, inside)
    ret = _load(ret_ptr, rows, cols, s_ret_r, s_ret_t, inside)
    m = _load(mask_ptr, rows, cols, s_m_r, s_m_t, inside)
    flat = rows[:, None] * T + cols[None, :]
    w = tl.load(w_ptr + flat, mask=inside, other=0.0)
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
        tl.store(gfac_ptr + flat, tl.where(valid, dloss * w, 0.0), mask=inside)

    pid = pid_r.to(tl.int64) * tl.num_programs(1) + pid_t
    tl.store(partial_ptr + 0 * P + pid, tl.sum(tl.sum(tl.where(valid, loss * w, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 1 * P + pid, tl.sum(tl.sum(tl.where(valid, m, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 2 * P + pid, tl.sum(tl.sum(tl.where(valid, clipped * m, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + 3 * P + pid, tl.sum(tl.sum(tl.where(valid, v * m, 0.0), axis=1), axis=0))


@triton.jit
def _finalize_kernel(partial_ptr, out_ptr, P, NSTAT: tl.constexpr, BLOCK: tl.constexpr):
    """One program: out[0] = sum of the loss partials; out[k] = sum_k / max(count, 1) for the statistics."""
    slots = tl.arange(0, NSTAT).to(tl.int64)
    acc = tl.zeros((NSTAT, BLOCK), tl.float32)
    for start in range(0, P, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(partial_ptr + slots[:, None] * P + idx[None, :], mask=idx[None, :] < P, other=0.0)
    sums = tl.sum(acc, axis=1)
    count = tl.sum(tl.where(slots == 1, sums, 0.0), axis=0)
    means = sums / tl.maximum(count, 1.0)
    tl.store(out_ptr + slots, tl.where(slots == 0, sums, tl.where(slots == 1, count, means)))


def _tiles(R: int, T: int):
    block_t = min(triton.next_power_of_2(max(T, 1)), TILE)
    block_r = max(1, TILE // block_t)
    return block_r, block_t, triton.cdiv(R, block_r), triton.cdiv(T, block_t)


def _strides(t: torch.Tensor):
    return (t, t.stride(0), t.stride(1))


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _finalize(partials: torch.Tensor, P: int) -> torch.Tensor:
    out = torch.empty(NSTAT, dtype=torch.float32, device=partials.device)
    _finalize_kernel[(1,)](partials, out, P, NSTAT=NSTAT, BLOCK=FINAL_BLOCK)
    return out


@triton.jit
def _scale_kernel(gfac_ptr, g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The shared backward: ``grad_x = (dl/dx * w) * upstream``, cast to the input's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr).to(tl.float32)
    fac = tl.load(gfac_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, (fac * g).to(out_ptr.dtype.element_ty), mask=inside)


def _backward(gfac: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(gfac.shape, dtype=dtype, device=gfac.device)
    n = gfac.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, TILE),)](gfac, grad_loss.reshape(1).to(torch.float32), out, n, BLOCK=TILE)
    return out


class _Reduction:
    """What both loss Functions share: tiles, the per-program partial sums, the saved ``dl/dx * w`` factor."""

    def __init__(self, ctx, x: torch.Tensor, weights: torch.Tensor):
        R, T = x.shape
        self.block_r, self.block_t, grid_r, grid_t = _tiles(R, T)
        self.grid = (grid_r, grid_t)
        self.programs = grid_r * grid_t
        self.store_grad = ctx.needs_input_grad[0]
        alloc = torch.empty if self.programs else torch.zeros
        self.partials = alloc((NSTAT, max(self.programs, 1)), dtype=torch.float32, device=x.device)
        # Without a gradient to store the kernel never writes gfac: any float32 [R, T] buffer will do.
        self.gfac = torch.empty((R, T), dtype=torch.float32, device=x.device) if self.store_grad else weights

    def finish(self, ctx, x: torch.Tensor) -> torch.Tensor:
        out = _finalize(self.partials, max(self.programs, 1))
        if self.store_grad:
            ctx.save_for_backward(self.gfac)
        ctx.store_grad = self.store_grad
        ctx.dtype = x.dtype
        return out


def _loss_backward(ctx, grad_loss, num_inputs: int):
    # Only the first input (logp or values) is differentiable; the others get None.
    if not ctx.store_grad:
        return (None,) * num_inputs
    (gfac,) = ctx.saved_tensors
    return (_backward(gfac, grad_loss, ctx.dtype),) + (None,) * (num_inputs - 1)


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, weights, is_weights, clip_low, clip_high, dual_clip):
        red = _Reduction(ctx, logp, weights)
        if red.programs:
            isw = is_weights if is_weights is not None else logp
            _policy_fwd_kernel[red.grid](
                *_strides(logp), *_strides(old_logp), *_strides(advantages), *_strides(isw),
                *_strides(_mask_view(mask)), weights, red.gfac, red.partials, *logp.shape, red.programs,
                float(clip_low), float(clip_high), float(dual_clip if dual_clip is not None else 0.0),
                HAS_DUAL=dual_clip is not None, HAS_ISW=is_weights is not None, STORE_GRAD=red.store_grad,
                BLOCK_R=red.block_r, BLOCK_T=red.block_t,
            )
        out = red.finish(ctx, logp)
        stats = (out[_CLIP], out[_KL], out[_RATIO], out[_DUAL])
        ctx.mark_non_differentiable(*stats)
        return (out[_LOSS], *stats)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *_):
        return _loss_backward(ctx, grad_loss, 9)


class _ValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, weights, clip):
        red = _Reduction(ctx, values, weights)
        if red.programs:
            _value_fwd_kernel[red.grid](
                *_strides(values), *_strides(old_values), *_strides(returns), *_strides(_mask_view(mask)),
                weights, red.gfac, red.partials, *values.shape, red.programs,
                float(clip if clip is not None else 0.0),
                HAS_CLIP=clip is not None, STORE_GRAD=red.store_grad, BLOCK_R=red.block_r, BLOCK_T=red.block_t,
            )
        out = red.finish(ctx, values)
        stats = (out[_VCLIP], out[_VALUE])
        ctx.mark_non_differentiable(*stats)
        return (out[_LOSS], *stats)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *_):
        return _loss_backward(ctx, grad_loss, 6)


def _check_rows(name: str, t: torch.Tensor, shape) -> None:
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} ([R, T]), got {tuple(t.shape)}")


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
) -> tuple[torch.Tensor, dict]:
    """Triton clipped PPO policy loss on ``[R, T]`` tensors (``advantages`` ``[R, T]`` or ``[R]``).

    Differentiable with respect to ``logp`` only (as docs/API.md specifies): ``old_logp``, ``advantages`` and
    ``is_weights`` are treated as constants even if they require grad.
    """
    clip_high = clip_low if clip_high is None else clip_high
    # Constants of the loss even if they require grad: the loss then requires grad only through ``logp``.
    old_logp, advantages, mask = old_logp.detach(), advantages.detach(), mask.detach()
    is_weights = None if is_weights is None else is_weights.detach()
    if logp.dim() != 2:
        raise ValueError(f"logp: expected a 2-d tensor [R, T], got shape {tuple(logp.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand(logp.shape)
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask), ("is_weights", is_weights)):
        if t is not None:
            _check_rows(name, t, logp.shape)
    weights = token_weights(mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale).contiguous()
    loss, clip_frac, approx_kl, ratio_mean, dual_frac = _PolicyLoss.apply(
        logp, old_logp, advantages, mask, weights, is_weights, clip_low, clip_high, dual_clip
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
    old_values, returns, mask = old_values.detach(), returns.detach(), mask.detach()
    if values.dim() != 2:
        raise ValueError(f"values: expected a 2-d tensor [R, T], got shape {tuple(values.shape)}")
    for name, t in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        _check_rows(name, t, values.shape)
    weights = token_weights(mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale).contiguous()
    loss, clip_frac, value_mean = _ValueLoss.apply(values, old_values, returns, mask, weights, clip)
    return loss, {"clip_frac": clip_frac, "value_mean": value_mean}


KERNELS = {"ppo_policy_loss": ppo_policy_loss, "ppo_value_loss": ppo_value_loss}
