"""Mask-aware GAE and masked whitening as Triton kernels.

GAE
---
One program per row, the whole batch in one launch. The backward recursion over valid tokens

    S <- V_t,  A <- (r_t - V_t) + gamma * S_old + gamma * lam * A_old      (t valid; masked t leave S, A alone)

is an affine map of the state ``(S, A)`` = (value, advantage of the next valid token) with a lower-triangular
matrix, so a row is swept from its end in chunks of ``CHUNK`` tokens: each chunk is loaded in reverse time order,
its maps are composed with ``tl.associative_scan`` (log depth instead of ``CHUNK`` dependent steps), applied to the
state carried in from the later chunks, and the state at the chunk's earliest token is carried on. Masked tokens are
identity maps, exactly neutral in the composition, so they are skipped (never zeroed into the recursion), as
docs/API.md asks. Chunks are aligned to ``t = 0`` and ``CHUNK`` is a constant, so a row's results depend only on
that row: not on the batch size, the other rows, or padding appended after it (bitwise). The association order of
the scan differs from the reference's sequential loop, so results agree with it to float32 rounding, not bitwise.

``gamma`` and ``gamma * lam`` are computed on the host in double precision (as the reference's Python scalars are)
and cast explicitly to fp32 inside the kernel. Inputs may be fp32 / fp16 / bf16 with any strides; outputs fp32.

masked_whiten
-------------
Three launches with a fixed reduction order: per-block (sum, count, centred sum of squares about the block mean),
one program that merges the blocks in a fixed order (Chan et al.'s pairwise update, vectorised) into the global mean
and ``rsqrt(var + eps)`` with the unbiased variance, and an elementwise normalise. The mask is read as 0/1
(non-zero counts). With autograd recording and ``x`` requiring grad, the call falls back to the PyTorch reference
(which is differentiable); the trainer calls it without grad.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting
from ..reference import advantages as _reference

GAE_CHUNK = 1024  # tokens per scan on the GPU
GAE_CHUNK_INTERPRETED = 64  # under TRITON_INTERPRET the scan runs element by element in Python: keep tiles small
WHITEN_BLOCK = 4096
WHITEN_FINAL_BLOCK = 1024


@triton.jit
def _affine_combine(a1, c1, d1, p1, q1, a2, c2, d2, p2, q2):
    # Maps (S, A) -> (a S + p, c S + d A + q). Returns map2 o map1 (map1 holds the earlier-applied, later-in-time
    # tokens).
    a = a2 * a1
    c = c2 * a1 + d2 * c1
    d = d2 * d1
    p = a2 * p1 + p2
    q = c2 * p1 + d2 * q1 + q2
    return a, c, d, p, q


@triton.jit
def _gae_kernel(
    r_ptr, s_r_b, s_r_t,
    v_ptr, s_v_b, s_v_t,
    m_ptr, s_m_b, s_m_t,
    adv_ptr, ret_ptr,
    T, n_chunks, gamma, gamma_lam,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.cast(gamma, tl.float32)
    gl = tl.cast(gamma_lam, tl.float32)
    i = tl.arange(0, CHUNK)
    is_first = i == CHUNK - 1  # the earliest token of a chunk (loaded in reverse time order)
    carry_s = 0.0
    carry_a = 0.0
    for k in range(n_chunks):
        t = tl.cast(n_chunks - 1 - k, tl.int64) * CHUNK + (CHUNK - 1 - i)
        inside = t < T
        r = tl.load(r_ptr + row * s_r_b + t * s_r_t, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * s_v_b + t * s_v_t, mask=inside, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + row * s_m_b + t * s_m_t, mask=inside, other=0).to(tl.float32)
        valid = inside & (m != 0.0)
        a = tl.where(valid, 0.0, 1.0)
        c = tl.where(valid, g, 0.0)
        d = tl.where(valid, gl, 1.0)
        p = tl.where(valid, v, 0.0)
        q = tl.where(valid, r - v, 0.0)
        a, c, d, p, q = tl.associative_scan((a, c, d, p, q), 0, _affine_combine)
        s_state = a * carry_s + p
        a_state = c * carry_s + d * carry_a + q
        out = row * T + t
        tl.store(adv_ptr + out, tl.where(valid, a_state, 0.0), mask=inside)
        tl.store(ret_ptr + out, tl.where(valid, a_state + v, 0.0), mask=inside)
        carry_s = tl.sum(tl.where(is_first, s_state, 0.0), axis=0)
        carry_a = tl.sum(tl.where(is_first, a_state, 0.0), axis=0)


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton mask-aware GAE over ``[B, T]``; float32 ``(advantages, returns)``, 0 at masked tokens.

    ``chunk`` (a power of two) overrides the scan tile, for tests; results agree across chunks to rounding.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected a 2-d tensor [B, T], got shape {tuple(rewards.shape)}")
    B, T = rewards.shape
    chunk = chunk or (GAE_CHUNK_INTERPRETED if interpreting() else GAE_CHUNK)
    advantages = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    returns = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    if B == 0 or T == 0:
        return advantages, returns
    m = _mask_view(mask)
    _gae_kernel[(B,)](
        rewards, rewards.stride(0), rewards.stride(1),
        values, values.stride(0), values.stride(1),
        m, m.stride(0), m.stride(1),
        advantages, returns,
        T, triton.cdiv(T, chunk), float(gamma), float(gamma) * float(lam),
        CHUNK=chunk, num_warps=4,
    )
    return advantages, returns


@triton.jit
def _whiten_partial_kernel(x_ptr, m_ptr, part_ptr, N, P, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inside, other=0).to(tl.float32)
    valid = inside & (m != 0.0)
    count = tl.sum(tl.where(valid, 1.0, 0.0), axis=0)
    total = tl.sum(tl.where(valid, x, 0.0), axis=0)
    mean = total / tl.maximum(count, 1.0)
    centred = tl.where(valid, x - mean, 0.0)
    m2 = tl.sum(centred * centred, axis=0)
    tl.store(part_ptr + pid, total)
    tl.store(part_ptr + P + pid, count)
    tl.store(part_ptr + 2 * P + pid, m2)


@triton.jit
def _whiten_finalize_kernel(part_ptr, out_ptr, P, eps, BLOCK: tl.constexpr):
    """One program: global mean and rsqrt(unbiased var + eps) from the block partials, in a fixed order."""
    acc_sum = tl.zeros((BLOCK,), tl.float32)
    acc_cnt = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, P, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = idx < P
        acc_sum += tl.load(part_ptr + idx, mask=inside, other=0.0)
        acc_cnt += tl.load(part_ptr + P + idx, mask=inside, other=0.0)
    total = tl.sum(acc_sum, axis=0)
    count = tl.sum(acc_cnt, axis=0)
    mean = total / tl.maximum(count, 1.0)
    acc_m2 = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, P, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = idx < P
        s = tl.load(part_ptr + idx, mask=inside, other=0.0)
        n = tl.load(part_ptr + P + idx, mask=inside, other=0.0)
        m2 = tl.load(part_ptr + 2 * P + idx, mask=inside, other=0.0)
        dev = tl.where(n > 0.0, s / tl.maximum(n, 1.0) - mean, 0.0)
        acc_m2 += m2 + n * dev * dev
    var = tl.sum(acc_m2, axis=0) / tl.maximum(count - 1.0, 1.0)
    rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))
    tl.store(out_ptr, mean)
    tl.store(out_ptr + 1, rstd)


@triton.jit
def _whiten_apply_kernel(x_ptr, m_ptr, stat_ptr, y_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inside, other=0).to(tl.float32)
    mean = tl.load(stat_ptr)
    rstd = tl.load(stat_ptr + 1)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y = y + mean
    tl.store(y_ptr + offs, tl.where(m != 0.0, y, 0.0), mask=inside)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Triton masked whitening over all positions of ``x`` (any shape); float32, 0 where ``mask`` is 0.

    Differentiable only through the reference: when autograd records and ``x`` requires grad, the reference runs.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    shape = x.shape
    xf = x.reshape(-1).contiguous()
    mf = _mask_view(mask).reshape(-1).contiguous()
    n = xf.numel()
    y = torch.empty(n, dtype=torch.float32, device=x.device)
    P = max(triton.cdiv(n, WHITEN_BLOCK), 1)
    partials = torch.empty(3 * P, dtype=torch.float32, device=x.device)
    stats = torch.empty(2, dtype=torch.float32, device=x.device)
    _whiten_partial_kernel[(P,)](xf, mf, partials, n, P, BLOCK=WHITEN_BLOCK)
    _whiten_finalize_kernel[(1,)](partials, stats, P, float(eps), BLOCK=WHITEN_FINAL_BLOCK)
    if n:
        _whiten_apply_kernel[(P,)](xf, mf, stats, y, n, SHIFT_MEAN=shift_mean, BLOCK=WHITEN_BLOCK)
    return y.view(shape)


KERNELS = {"gae": gae, "masked_whiten": masked_whiten}
