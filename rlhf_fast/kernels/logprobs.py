"""Triton log-probs and entropy from logits: ``selective_log_softmax`` and ``logprobs_and_entropy``.

Design (one program per row of ``logits[N, V]``, never a row split across programs, so a row's result does not
depend on the batch it sits in):

- forward: one pass over the row in vocabulary chunks of ``BLOCK_V``, each chunk loaded in the input dtype and
  converted to float32 in registers. An online max ``m``, sum-exp ``s = sum exp(z - m)`` and, for the entropy,
  ``t = sum exp(z - m) * (z - m)`` (kept relative to the running max, so large logits do not cancel) give
  ``lse = m + log s`` and ``H = log s - t / s``. The label logit is one scalar load. Nothing of size ``[N, V]``
  is ever written, and no float32 copy of the logits exists.
- backward: one pass that recomputes ``log p = z - lse`` from the saved log-sum-exp (and entropy) and writes
  ``d/dx = (g_logp * (onehot - p) - g_H * p * (log p + H)) / temperature`` in the input dtype.
  Rows whose upstream gradients are both 0 are written as zeros without reading the logits.
- no-grad fast path: the forward writes only the per-token outputs (no log-sum-exp buffer).

``_online_lse_pass`` and ``_logits_grad_kernel`` are shared with the fused PPO loss (``fused_loss.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only

# Vocabulary chunk per loop step of the statistics pass (one warp per row, many rows per SM: Liger's tuned point
# for this loop on H100) and of the gradient pass (read + write: a wide chunk and 16 warps). Both depend on V
# only, never on the batch (batch invariance). Tests lower MAX_BLOCK_V to cover multi-chunk rows cheaply.
FWD_BLOCK_V = 2048
BWD_BLOCK_V = 4096
MAX_BLOCK_V = 1 << 16
# Finite start of the running max, so that ``m - m_new`` is never ``-inf - -inf``. Padded lanes (and real -inf
# logits) are -inf: their probability is exactly 0, and the entropy terms select 0 instead of 0 * -inf.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


def forward_config(vocab: int, *, with_entropy: bool = True) -> dict:
    """Launch parameters of the statistics pass."""
    block = min(FWD_BLOCK_V, MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return {"BLOCK_V": block, "num_warps": 1 if block <= 2048 else 4, "num_stages": 2 if with_entropy else 4}


def backward_config(vocab: int) -> dict:
    """Launch parameters of the gradient pass."""
    block = min(BWD_BLOCK_V, MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return {"BLOCK_V": block, "num_warps": 16 if block >= 4096 else max(1, block // 256), "num_stages": 1}


@triton.jit
def _online_lse_pass(
    x_ptr, V, inv_t, HAS_TEMP: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr
):
    """One pass over a row: running max ``m``, ``s = sum e^(z-m)``, ``t = sum e^(z-m) (z-m)`` in float32."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), NEG_BIG, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(x_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        if HAS_TEMP:
            z = z * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        zc = z - m_new
        e = tl.exp(zc)
        if WITH_ENTROPY:
            # e * (z - m) is 0 for a -inf logit (e == 0), never 0 * -inf.
            ez = tl.where(z > NEG_BIG, e * zc, 0.0)
            t = alpha * (t + (m - m_new) * s) + tl.sum(ez, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    return m, s, t


@triton.jit
def _lse(m, log_s):
    """``m + log s``, and +inf when the running max is +inf: a +inf logit makes ``s`` nan (inf - inf), while the
    reference's log-sum-exp is +inf, so a finite label's log-prob is -inf as there (the entropy stays nan)."""
    return tl.where(m == float("inf"), m, m + log_s)


@triton.jit
def _logprobs_fwd_kernel(
    X,
    stride_xr,
    stride_xt,
    T_INNER,
    LABELS,
    LOGP,
    ENT,
    LSE,
    V,
    inv_t,
    HAS_TEMP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r = row // T_INNER  # token row = (r, tt) of an [R, T_INNER, V] view (T_INNER = 1 for [N, V])
    tt = row - r * T_INNER
    inv_t = tl.cast(inv_t, tl.float32)
    x_ptr = X + r * stride_xr + tt * stride_xt
    m, s, t = _online_lse_pass(x_ptr, V, inv_t, HAS_TEMP, WITH_ENTROPY, BLOCK_V)
    log_s = tl.log(s)
    lse = _lse(m, log_s)
    label = tl.load(LABELS + row).to(tl.int64)
    z_label = tl.load(x_ptr + label).to(tl.float32)
    if HAS_TEMP:
        z_label = z_label * inv_t
    tl.store(LOGP + row, z_label - lse)
    if WITH_ENTROPY:
        tl.store(ENT + row, log_s - t / s)
    if STORE_LSE:
        tl.store(LSE + row, lse)


@triton.jit
def _logits_grad_kernel(
    X,
    stride_xr,
    stride_xt,
    DX,
    stride_dr,
    stride_dt,
    T_INNER,
    LABELS,
    stride_lr,
    stride_lt,
    LSE,
    ENT,
    G_LOGP,
    G_ENT,
    ROW_SCALE,
    SCALE,
    V,
    inv_t,
    HAS_TEMP: tl.constexpr,
    HAS_LOGP_GRAD: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``dx = scale / T * (g_logp * (onehot - p) - g_H * p * (log p + H))`` for row ``n`` = (r, t) =
    (n // T_INNER, n % T_INNER), with ``scale = ROW_SCALE[r] * SCALE[0]`` (each factor only when its flag is set).

    The label of token ``n`` is ``LABELS[r * stride_lr + t * stride_lt]`` (a contiguous ``[N]`` is
    ``(T_INNER, 1)``); the other per-token inputs are contiguous ``[N]``. ``ROW_SCALE`` is the fused PPO loss's
    per-row aggregation factor ``f_r`` (``fused_loss.py``). ``X`` and ``DX`` may be the same buffer (gradient
    written over the logits): each element is read before its own lane writes it, and no other program touches the
    row.
    """
    n = tl.program_id(0).to(tl.int64)
    r = n // T_INNER
    tt = n - r * T_INNER
    inv_t = tl.cast(inv_t, tl.float32)
    dx_ptr = DX + r * stride_dr + tt * stride_dt
    cols = tl.arange(0, BLOCK_V)
    g_logp = tl.zeros((), tl.float32)
    g_ent = tl.zeros((), tl.float32)
    if HAS_LOGP_GRAD:
        g_logp = tl.load(G_LOGP + n).to(tl.float32)
    if HAS_ENT_GRAD:
        g_ent = tl.load(G_ENT + n).to(tl.float32)
    if (g_logp == 0.0) & (g_ent == 0.0):
        # Masked token (or a zero upstream gradient): the gradient row is exactly 0, no need to read logits.
        zero = tl.zeros((BLOCK_V,), tl.float32).to(DX.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            tl.store(dx_ptr + idx, zero, mask=idx < V)
        return
    scale = tl.full((), 1.0, tl.float32)
    if HAS_TEMP:
        scale = inv_t
    if HAS_ROW_SCALE:
        scale = scale * tl.load(ROW_SCALE + r)
    if HAS_SCALE:
        scale = scale * tl.load(SCALE).to(tl.float32)
    g_logp = g_logp * scale
    g_ent = g_ent * scale
    x_ptr = X + r * stride_xr + tt * stride_xt
    lse = tl.load(LSE + n)
    ent = tl.zeros((), tl.float32)
    if HAS_ENT_GRAD:
        ent = tl.load(ENT + n)
    label = tl.load(LABELS + r * stride_lr + tt * stride_lt).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        valid = idx < V
        z = tl.load(x_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
        if HAS_TEMP:
            z = z * inv_t
        logp = z - lse
        p = tl.exp(logp)
        g = tl.where(idx == label, g_logp - g_logp * p, -g_logp * p)
        if HAS_ENT_GRAD:
            # A -inf logit has p == 0 and contributes 0, never 0 * -inf; 0 * ent keeps a nan entropy (a +inf
            # logit in the row) in every lane, as the reference's gradient has it.
            g = g - tl.where(p > 0.0, g_ent * p * (logp + ent), 0.0 * ent)
        tl.store(dx_ptr + idx, g.to(DX.dtype.element_ty), mask=valid)


@triton.jit
def _scale_rows_kernel(X, stride_xr, stride_xt, T_INNER, SCALE, V, BLOCK_V: tl.constexpr):
    """``x *= scale`` in place, row by row (no autograd version bump, unlike ``Tensor.mul_``).

    With ``scale == 1`` (the usual upstream gradient of a loss) every program returns at once: the host never
    has to sync to find out whether the pass is needed.
    """
    scale = tl.load(SCALE).to(tl.float32)
    if scale == 1.0:
        return
    n = tl.program_id(0).to(tl.int64)
    r = n // T_INNER
    tt = n - r * T_INNER
    x_ptr = X + r * stride_xr + tt * stride_xt
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        valid = idx < V
        x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        tl.store(x_ptr + idx, (x * scale).to(X.dtype.element_ty), mask=valid)


# ---- host side --------------------------------------------------------------------------------------------


def _inv_temperature(temperature: float) -> tuple[float, bool]:
    temperature = float(temperature)
    return 1.0 / temperature, temperature != 1.0


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` or ``[R, T, V]`` with a contiguous last dimension (the kernels take the other two strides), so
    a sliced view such as ``logits[:, :-1]`` is read in place instead of copied."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _time_extent(logits: torch.Tensor) -> int:
    return logits.shape[1] if logits.dim() == 3 else 1


def logprobs_forward(logits, labels, temperature, *, with_entropy: bool, store_lse: bool):
    """Launch the statistics pass; returns float32 ``(logp, entropy or None, lse or None)``."""
    logits = _rows(logits)
    labels = labels.contiguous()
    rows, vocab = labels.numel(), logits.shape[-1]
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    ent = torch.empty_like(logp) if with_entropy else None
    lse = torch.empty_like(logp) if store_lse else None
    if rows:
        inv_t, has_temp = _inv_temperature(temperature)
        xs = _strides(logits)
        _logprobs_fwd_kernel[(rows,)](
            logits, xs[0], xs[1], _time_extent(logits), labels, logp, ent if with_entropy else logp, lse if store_lse else logp,
            vocab, inv_t, HAS_TEMP=has_temp, WITH_ENTROPY=with_entropy, STORE_LSE=store_lse,
            **forward_config(vocab, with_entropy=with_entropy),
        )
    return logp, ent, lse


def launch_logits_grad(
    logits, grad, labels, lse, ent, g_logp, g_ent, scale, temperature, *, t_inner: int, row_scale=None
) -> None:
    """Write the gradient of ``sum_n(g_logp * logp + g_ent * H) * f[n // t_inner] * scale`` w.r.t. ``logits``.

    ``logits`` and ``grad`` are ``[N, V]`` or ``[R, T_INNER, V]`` with a contiguous last dimension (they may be
    the same tensor); ``labels`` is contiguous ``[N]``, or ``[R, T_INNER]`` with any strides; the other per-token
    tensors are contiguous ``[N]``; ``g_logp`` / ``g_ent`` / ``scale`` (a one-element tensor, read on the device)
    and ``row_scale`` (float32 ``f``, one per ``t_inner`` tokens) may be None.
    """
    vocab = logits.shape[-1]
    rows = labels.numel()
    if rows == 0:
        return
    xs = _strides(logits)
    ds = _strides(grad)
    ls = labels.stride() if labels.dim() == 2 else (t_inner, 1)
    inv_t, has_temp = _inv_temperature(temperature)
    dummy = lse
    _logits_grad_kernel[(rows,)](
        logits, xs[0], xs[1], grad, ds[0], ds[1], t_inner, labels, ls[0], ls[1], lse,
        dummy if ent is None else ent, dummy if g_logp is None else g_logp, dummy if g_ent is None else g_ent,
        dummy if row_scale is None else row_scale, dummy if scale is None else scale, vocab, inv_t,
        HAS_TEMP=has_temp, HAS_LOGP_GRAD=g_logp is not None, HAS_ENT_GRAD=g_ent is not None,
        HAS_ROW_SCALE=row_scale is not None, HAS_SCALE=scale is not None, **backward_config(vocab),
    )


def launch_scale_rows(x: torch.Tensor, scale: torch.Tensor, *, t_inner: int) -> None:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return
    xs = _strides(x)
    _scale_rows_kernel[(rows,)](x, xs[0], xs[1], t_inner, scale, x.shape[-1], **backward_config(x.shape[-1]))


def _strides(x: torch.Tensor) -> tuple[int, int]:
    """(row stride, inner-time stride) of ``[N, V]`` (inner stride unused) or ``[R, T, V]``."""
    if x.dim() == 2:
        return x.stride(0), 0
    return x.stride(0), x.stride(1)


class _LogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy):
        logits = _rows(logits)
        labels = labels.contiguous()
        logp, ent, lse = logprobs_forward(logits, labels, temperature, with_entropy=with_entropy, store_lse=True)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @first_order_only
    def backward(ctx, g_logp, g_ent=None):
        logits, labels, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        launch_logits_grad(
            logits, grad, labels, lse, ent,
            None if g_logp is None else g_logp.float().contiguous(),
            None if g_ent is None else g_ent.float().contiguous(),
            None, ctx.temperature, t_inner=_time_extent(logits),
        )
        return grad, None, None, None


def _needs_grad(logits: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and logits.requires_grad


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[label]`` for ``logits[N, V]`` or ``[R, T, V]`` (any strides but a
    contiguous last dimension) and ``labels[N]``; float32 ``[N]``."""
    if _needs_grad(logits):
        return _LogProbsFunction.apply(logits, labels, float(temperature), False)
    logp, _, _ = logprobs_forward(logits, labels, float(temperature), with_entropy=False, store_lse=False)
    return logp


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label log-prob and entropy of ``softmax(logits / temperature)``, float32 ``[N]`` each.

    Unlike the reference, a ``-inf`` logit is fine for the entropy too (its ``p log p`` term is 0).
    """
    if _needs_grad(logits):
        return _LogProbsFunction.apply(logits, labels, float(temperature), True)
    logp, ent, _ = logprobs_forward(logits, labels, float(temperature), with_entropy=True, store_lse=False)
    return logp, ent


KERNELS = {"selective_log_softmax": selective_log_softmax, "logprobs_and_entropy": logprobs_and_entropy}
