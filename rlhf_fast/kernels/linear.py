"""Triton kernels: per-token log-probs, entropy and the PPO loss straight from hidden states and the LM head.

``hidden[N, H]`` times ``weight[V, H]`` is never materialised as ``[N, V]`` logits. The work is split in a way
that keeps every per-token result batch-invariant (a token's numbers depend only on its own row, never on
``N``) and every reduction in a fixed order:

Forward (``_lse_partials_kernel`` + ``_lse_combine_kernel``)
    A program owns ``BLOCK_N`` tokens and one *vocabulary split* (``TILES_PER_SPLIT`` tiles of ``BLOCK_V``
    columns). For each tile it builds the logit tile with ``tl.dot`` over ``BLOCK_K`` slices of ``H`` (fp32
    accumulation; bf16 / fp16 operands go to the tensor cores as they are), adds the bias, divides by the
    temperature and folds the tile into an online log-sum-exp ``(m, s)`` and entropy sum ``t = sum e^(z-m) z``;
    the label's logit is picked when its tile passes. The per-split partials ``[4, S, N]`` are combined per
    token, splits in order, by a tiny second kernel. ``S`` depends on ``V`` only, so the split does not move
    with ``N``, and the grid has ``cdiv(N, BLOCK_N) * S`` programs: enough to fill the GPU at small ``N`` too.

Backward (per vocabulary chunk of ``CHUNK_V`` columns, chunks in order)
    ``_grad_logits_kernel`` recomputes the chunk's logit tiles, forms
    ``dz = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / temperature`` and writes it in the operand
    dtype to a ``[N, CHUNK_V]`` buffer (bias gradient: per-token-block column sums in fp32, summed in order);
    ``_dhidden_kernel`` computes ``dz @ weight[chunk]`` and adds the fp32 ``d_hidden`` of the earlier chunks
    (chunks in order; cast once at the end);
    ``_dweight_kernel`` computes ``weight``'s rows of the chunk as ``dz.T @ hidden`` with the sum over *all*
    tokens in fp32 registers, cast once (no bf16 accumulation of the weight gradient across token chunks).
    Extra memory: ``N * CHUNK_V`` operand-dtype values + ``N * H`` fp32 + O(N) vectors; never ``[N, V]``.

Work: forward 1 matmul; backward 3 (logit recompute, d_hidden, d_weight) -> 4 matmuls' worth for fwd+bwd.
The PPO loss uses the same passes: its per-token math (ratio, clipping, KL, entropy bonus, aggregation) is the
reference's torch code on the ``[R, T]`` log-prob / entropy vectors between the two passes (O(N), exact same
stats), and autograd hands the per-token gradients to the backward pass above. Getting the PPO loss down to
three matmuls' worth needs the logits of a token chunk held while its log-sum-exp completes, with the weight
gradient accumulated across token chunks: in fp32 that is a ``[V, H]`` fp32 buffer (2.5 GB at V=152k, H=4096),
in bf16 it is the peers' divergence bug. We pay the fourth matmul instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.losses import policy_loss_terms
from ._autograd import first_order_only
from .logprobs import _lse


# --------------------------------------------------------------------------------------------------------------
# Tile configuration: a function of (H, V, dtype, device) only, never of N (batch invariance).
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearConfig:
    block_n: int  # tokens per program (forward and logit-gradient kernels)
    block_v: int  # vocabulary columns per logit tile
    block_k: int  # slice of H per tl.dot
    tiles_per_split: int  # logit tiles per forward program (vocabulary split width = block_v * tiles_per_split)
    chunk_v: int  # vocabulary columns per backward chunk (a multiple of the gradient tile's block_v: full tiles)
    mm_block_m: int  # output rows per program of the d_hidden / d_weight matmuls
    mm_block_n: int  # output columns (H) per program of the d_hidden / d_weight matmuls
    mm_block_k: int  # reduction slice of the d_hidden / d_weight matmuls
    num_warps: int = 4
    num_stages: int = 1  # logit-tile kernels (forward, logit gradient)
    mm_num_stages: int = 1  # d_hidden / d_weight matmuls
    # Optional separate settings (None: as above). The matmuls' warps; the logit-gradient kernel's tile, whose
    # epilogue is lighter than the forward's online softmax (fewer registers), so it may want another shape.
    mm_num_warps: Optional[int] = None
    grad_block_n: Optional[int] = None
    grad_block_v: Optional[int] = None
    grad_block_k: Optional[int] = None
    grad_num_warps: Optional[int] = None
    grad_num_stages: Optional[int] = None

    @property
    def mm_warps(self) -> int:
        return self.mm_num_warps or self.num_warps

    @property
    def grad_tile(self) -> tuple[int, int, int, int, int]:
        """(block_n, block_v, block_k, num_warps, num_stages) of the logit-gradient kernel."""
        return (self.grad_block_n or self.block_n, self.grad_block_v or self.block_v, self.grad_block_k or self.block_k,
                self.grad_num_warps or self.num_warps, self.grad_num_stages or self.num_stages)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_config(hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device) -> LinearConfig:
    """Tile sizes for one call. Deliberately independent of the number of tokens."""
    if device.type != "cuda" or _interpreting():
        # The interpreter runs every program in numpy: small tiles keep CPU tests fast while still exercising
        # several vocabulary splits, several backward chunks and masked edges of every tile.
        return LinearConfig(block_n=16, block_v=32, block_k=32, tiles_per_split=2, chunk_v=64,
                            mm_block_m=16, mm_block_n=32, mm_block_k=32)
    if dtype == torch.float32:
        # 8 warps: with 4 the forward's tile spilled 440 bytes per thread (sm_90 compile), with 8 it spills 16.
        return LinearConfig(block_n=64, block_v=64, block_k=32, tiles_per_split=32, chunk_v=4096,
                            mm_block_m=64, mm_block_n=64, mm_block_k=32, num_warps=8, num_stages=3,
                            mm_num_stages=3)
    # Chosen by compiling for sm_90 without a GPU (tests/test_kernels_linear_compile.py): 128x128 tiles with
    # 8 warps; BLOCK_K=32 keeps the online-softmax epilogue of the logit-tile kernels free of register spills
    # (BLOCK_K=64 spilled ~600 bytes per thread). Not yet timed on a GPU: see the benchmark notes.
    chunk_v = min(8192, triton.cdiv(vocab, 128) * 128)
    return LinearConfig(block_n=128, block_v=128, block_k=32, tiles_per_split=16, chunk_v=chunk_v,
                        mm_block_m=128, mm_block_n=128, mm_block_k=64, num_warps=8, num_stages=4,
                        mm_num_stages=3)


DWEIGHT_GEMMS = ("triton", "torch")


def dweight_gemm_choice() -> str:
    """Who computes each vocabulary chunk's ``d_weight = dz.T @ hidden`` (one GEMM over all tokens either way).

    ``triton`` (default): ``_dweight_kernel``, fp32 accumulation in registers, cast once. ``torch``: ``torch.mm``
    (cuBLAS on CUDA), for timing the two side by side on a GPU (``RLHF_FAST_LINEAR_DWEIGHT=torch``); note that
    cuBLAS may reduce split-K partial sums in bf16 / fp16 unless
    ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` (or the fp16 one) is False. The weight
    gradient is a sum over tokens, so either choice leaves the per-token outputs (and their batch invariance)
    untouched."""
    value = os.environ.get("RLHF_FAST_LINEAR_DWEIGHT", "triton").strip().lower() or "triton"
    if value not in DWEIGHT_GEMMS:
        raise ValueError(f"RLHF_FAST_LINEAR_DWEIGHT: expected one of {list(DWEIGHT_GEMMS)}, got {value!r}")
    return value


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact products (no tf32) so that fp32 results match the fp32 reference.
    # Other dtypes: None, the default (ignored for fp16 / bf16 operands).
    return "ieee" if dtype == torch.float32 else None


# --------------------------------------------------------------------------------------------------------------
# Kernels
#
# Addressing: a program's first row / column is an int64 scalar folded into the base pointer; offsets inside a
# tile are int32 (a tile spans at most BLOCK * stride elements), which keeps register pressure of the pointer
# tensors low while [N, H] and [V, H] operands beyond 2**31 elements stay addressable.
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _logit_tile(h_blk, w_blk, b_blk, row_mask, col_mask, stride_h, stride_w, H,
                TEMP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """fp32 ``(hidden[blk] @ weight[blk].T + bias[blk]) / TEMP`` for one [BLOCK_N, BLOCK_V] tile."""
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = h_blk + r[:, None] * stride_h + k[None, :]
    b_ptrs = w_blk + c[None, :] * stride_w + k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = k < H - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_blk + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if TEMP != 1.0:
        acc = acc / TEMP
    return acc


@triton.jit
def _lse_partials_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, part_ptr, N, V, H, stride_h, stride_w, plane,
                         TEMP: tl.constexpr, HAS_BIAS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    h_blk = h_ptr + row0 * stride_h
    col0 = pid_s.to(tl.int64) * (TILES_PER_SPLIT * BLOCK_V)
    labels = tl.load(lab_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    # label position relative to the split (int32: |label - col0| < V)
    lab_rel = tl.where(row_mask, labels - col0, -1).to(tl.int32)
    c = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cols_left = V - col0
    for tile in range(0, TILES_PER_SPLIT):
        first = tile * BLOCK_V
        col_mask = c < cols_left - first
        z = _logit_tile(h_blk, w_ptr + (col0 + first) * stride_w, b_ptr + col0 + first, row_mask, col_mask,
                        stride_h, stride_w, H, TEMP, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # The first tile of every split holds a valid column, so m_new is finite from the first tile on;
        # tiles wholly past V (only in the last split) leave (m, s, t) unchanged.
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * tl.where(col_mask[None, :], z, 0.0), axis=1)
        m = m_new
        z_label += tl.sum(tl.where(c[None, :] == (lab_rel - first)[:, None], z, 0.0), axis=1)
    # part layout [4, S, N]: m, s, t, label logit; plane = S * N
    base = part_ptr + pid_s.to(tl.int64) * N + rows
    tl.store(base, m, mask=row_mask)
    base += plane
    tl.store(base, s, mask=row_mask)
    base += plane
    tl.store(base, t, mask=row_mask)
    base += plane
    tl.store(base, z_label, mask=row_mask)


@triton.jit
def _lse_combine_kernel(part_ptr, lse_ptr, logp_ptr, ent_ptr, N, num_splits, plane, BLOCK: tl.constexpr):
    """Per token, splits in order: lse = M + log(sum s_i e^(m_i - M)), entropy = lse - sum t_i e^(m_i - M) / s."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    m_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    ptr = part_ptr + rows
    for _ in range(0, num_splits):
        m_max = tl.maximum(m_max, tl.load(ptr, mask=mask, other=0.0))
        ptr += N
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK,), dtype=tl.float32)
    ptr = part_ptr + rows
    for _ in range(0, num_splits):
        alpha = tl.exp(tl.load(ptr, mask=mask, other=0.0) - m_max)
        ptr_s = ptr + plane
        ptr_t = ptr_s + plane
        s += tl.load(ptr_s, mask=mask, other=1.0) * alpha
        t += tl.load(ptr_t, mask=mask, other=0.0) * alpha
        z_label += tl.load(ptr_t + plane, mask=mask, other=0.0)
        ptr += N
    lse = _lse(m_max, tl.log(s))
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(logp_ptr + rows, z_label - lse, mask=mask)
    tl.store(ent_ptr + rows, lse - t / s, mask=mask)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, g_ptr, dbias_ptr,
                        N, H, v_start, chunk_width, stride_h, stride_w, stride_g,
                        TEMP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr,
                        HAS_GENT: tl.constexpr, WRITE_DBIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """dz tile of one vocabulary chunk: recompute the logits, then d(g_lp*logp + g_ent*entropy)/d(logits).

    ``w_ptr`` / ``b_ptr`` point at the chunk's first row; ``v_start`` is that row's index (labels only)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    first = pid_v * BLOCK_V  # first column of the tile inside the chunk
    c = tl.arange(0, BLOCK_V)
    col_mask = c < chunk_width - first
    z = _logit_tile(h_ptr + row0 * stride_h, w_ptr + first.to(tl.int64) * stride_w, b_ptr + first, row_mask,
                    col_mask, stride_h, stride_w, H, TEMP, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    coef = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_GLP:
        g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
        coef += g_lp[:, None]
    if HAS_GENT:
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        coef += g_ent[:, None] * (log_p + ent[:, None])
    dz = -p * coef
    if HAS_GLP:
        labels = tl.load(lab_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        lab_rel = tl.where(row_mask, labels - v_start - first, -1).to(tl.int32)
        dz += tl.where(c[None, :] == lab_rel[:, None], g_lp[:, None], 0.0)
    if TEMP != 1.0:
        dz = dz / TEMP
    valid = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(valid, dz, 0.0)
    g_blk = g_ptr + row0 * stride_g + first
    tl.store(g_blk + tl.arange(0, BLOCK_N)[:, None] * stride_g + c[None, :], dz.to(g_ptr.dtype.element_ty),
             mask=valid)
    if WRITE_DBIAS:
        # [num_token_blocks, chunk] fp32 partial column sums, reduced over token blocks in order on the host.
        tl.store(dbias_ptr + pid_n.to(tl.int64) * stride_g + first + c, tl.sum(dz, axis=0), mask=col_mask)


@triton.jit
def _dhidden_kernel(g_ptr, w_ptr, dh_ptr, N, H, chunk_width, stride_g, stride_w, stride_dh,
                    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """fp32 d_hidden[rows, hs] = dz[rows, chunk] @ weight[chunk, hs] (+ d_hidden of the earlier chunks).
    ``w_ptr`` points at the chunk's first row."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    h0 = tl.program_id(1) * BLOCK_H
    r = tl.arange(0, BLOCK_M)
    hh = tl.arange(0, BLOCK_H)
    k = tl.arange(0, BLOCK_K)
    row_mask = r < N - row0
    h_mask = hh < H - h0
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    a_ptrs = g_ptr + row0 * stride_g + r[:, None] * stride_g + k[None, :]
    b_ptrs = w_ptr + h0 + k[:, None] * stride_w + hh[None, :]
    for k0 in range(0, chunk_width, BLOCK_K):
        k_mask = k < chunk_width - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_w
    # Earlier chunks' sum is added after this chunk's (fixed order; loading it before the loop would keep a
    # [BLOCK_M, BLOCK_H] pointer tensor live across the loop and spill).
    out = dh_ptr + row0 * stride_dh + h0 + r[:, None] * stride_dh + hh[None, :]
    out_mask = row_mask[:, None] & h_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=out_mask, other=0.0)
    tl.store(out, acc, mask=out_mask)


@triton.jit
def _dweight_kernel(g_ptr, h_ptr, dw_ptr, N, H, chunk_width, stride_g, stride_h, stride_dw,
                    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """d_weight[chunk rows, hs] = dz[:, chunk].T @ hidden[:, hs], summed over all tokens in fp32, cast once.
    ``dw_ptr`` points at the chunk's first row."""
    v0 = tl.program_id(0) * BLOCK_M
    h0 = tl.program_id(1) * BLOCK_H
    vv = tl.arange(0, BLOCK_M)
    hh = tl.arange(0, BLOCK_H)
    k = tl.arange(0, BLOCK_K)
    v_mask = vv < chunk_width - v0
    h_mask = hh < H - h0
    a_ptrs = g_ptr + v0 + k[None, :] * stride_g + vv[:, None]
    b_ptrs = h_ptr + h0 + k[:, None] * stride_h + hh[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        n_mask = k < N - n0
        a = tl.load(a_ptrs, mask=v_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_g
        b_ptrs += BLOCK_K * stride_h
    out = dw_ptr + v0.to(tl.int64) * stride_dw + h0 + vv[:, None] * stride_dw + hh[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=v_mask[:, None] & h_mask[None, :])


# --------------------------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------------------------
def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(hidden, weight, bias, labels, temperature: float, cfg: LinearConfig):
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, entropy, lse = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    if n == 0:
        return logp, entropy, lse
    num_splits = triton.cdiv(triton.cdiv(v, cfg.block_v), cfg.tiles_per_split)
    part = torch.empty(4, num_splits, n, **f32)
    _lse_partials_kernel[(triton.cdiv(n, cfg.block_n), num_splits)](
        hidden, weight, bias if bias is not None else hidden, labels, part, n, v, h,
        hidden.stride(0), weight.stride(0), num_splits * n,
        TEMP=float(temperature), HAS_BIAS=bias is not None, TILES_PER_SPLIT=cfg.tiles_per_split,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, DOT_PREC=_dot_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block = 128
    _lse_combine_kernel[(triton.cdiv(n, block),)](part, lse, logp, entropy, n, num_splits, num_splits * n,
                                                    BLOCK=block)
    return logp, entropy, lse


def _backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature: float,
              cfg: LinearConfig, need_hidden: bool, need_weight: bool, need_bias: bool):
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    d_hidden = torch.zeros(n, h, device=dev, dtype=torch.float32) if need_hidden else None
    d_weight = torch.zeros_like(weight) if need_weight else None
    d_bias = torch.zeros(v, device=dev, dtype=torch.float32) if need_bias else None
    if n == 0 or (grad_logp is None and grad_entropy is None):
        return (_cast(d_hidden, hidden.dtype), d_weight, _cast(d_bias, None if bias is None else bias.dtype))
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    prec = _dot_precision(hidden.dtype)
    dweight_gemm = dweight_gemm_choice()
    glp = grad_logp.float().contiguous() if grad_logp is not None else lse
    gent = grad_entropy.float().contiguous() if grad_entropy is not None else lse
    g_bn, g_bv, g_bk, g_warps, g_stages = cfg.grad_tile
    chunk = min(cfg.chunk_v, triton.cdiv(v, g_bv) * g_bv)
    dz = torch.empty(n, chunk, device=dev, dtype=hidden.dtype)
    token_blocks = triton.cdiv(n, g_bn)
    dbias_part = torch.empty(token_blocks, chunk, device=dev, dtype=torch.float32) if need_bias else None
    for v_start in range(0, v, chunk):
        width = min(chunk, v - v_start)
        w_chunk = weight[v_start : v_start + width]
        b_chunk = bias[v_start : v_start + width] if bias is not None else hidden
        _grad_logits_kernel[(token_blocks, triton.cdiv(width, g_bv))](
            hidden, w_chunk, b_chunk, labels, lse, entropy, glp, gent, dz,
            dbias_part if need_bias else dz, n, h, v_start, width, hidden.stride(0), weight.stride(0),
            dz.stride(0),
            TEMP=float(temperature), HAS_BIAS=bias is not None, HAS_GLP=grad_logp is not None,
            HAS_GENT=grad_entropy is not None, WRITE_DBIAS=need_bias, BLOCK_N=g_bn,
            BLOCK_V=g_bv, BLOCK_K=g_bk, DOT_PREC=prec, num_warps=g_warps, num_stages=g_stages,
        )
        if need_hidden:
            _dhidden_kernel[(triton.cdiv(n, cfg.mm_block_m), triton.cdiv(h, cfg.mm_block_n))](
                dz, w_chunk, d_hidden, n, h, width, dz.stride(0), weight.stride(0), d_hidden.stride(0),
                ACCUMULATE=v_start > 0, BLOCK_M=cfg.mm_block_m, BLOCK_H=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k,
                DOT_PREC=prec, num_warps=cfg.mm_warps, num_stages=cfg.mm_num_stages,
            )
        if need_weight and dweight_gemm == "torch":
            torch.mm(dz[:, :width].t(), hidden, out=d_weight[v_start : v_start + width])
        elif need_weight:
            _dweight_kernel[(triton.cdiv(width, cfg.mm_block_m), triton.cdiv(h, cfg.mm_block_n))](
                dz, hidden, d_weight[v_start : v_start + width], n, h, width, dz.stride(0), hidden.stride(0),
                d_weight.stride(0), BLOCK_M=cfg.mm_block_m, BLOCK_H=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k,
                DOT_PREC=prec, num_warps=cfg.mm_warps, num_stages=cfg.mm_num_stages,
            )
        if need_bias:
            # Sum over token blocks: a fixed-shape reduction, deterministic for a given N.
            d_bias[v_start : v_start + width] = dbias_part[:, :width].sum(0)
    return (_cast(d_hidden, hidden.dtype), d_weight, _cast(d_bias, None if bias is None else bias.dtype))


def _cast(t, dtype):
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


class _LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature):
        hidden, weight = _row_major(hidden), _row_major(weight)
        labels = labels.contiguous()
        bias_c = bias.contiguous() if bias is not None else None
        cfg = kernel_config(hidden.shape[1], weight.shape[0], hidden.dtype, hidden.device)
        logp, entropy, lse = _forward(hidden, weight, bias_c, labels, temperature, cfg)
        ctx.save_for_backward(hidden, weight, bias_c, labels, lse, entropy)
        ctx.temperature, ctx.cfg = temperature, cfg
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        d_hidden, d_weight, d_bias = _backward(
            hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.cfg,
            need_h, need_w, need_b and bias is not None,
        )
        return d_hidden, d_weight, d_bias, None, None


# --------------------------------------------------------------------------------------------------------------
# Implementations with the reference's signatures (rlhf_fast.reference.linear)
# --------------------------------------------------------------------------------------------------------------
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """``selective_log_softmax(hidden @ weight.T + bias, labels)`` for ``hidden[N, H]``; float32 ``[N]``."""
    logp, entropy = _LinearLogprobsFunction.apply(hidden, weight, bias, labels, float(temperature))
    return (logp, entropy) if return_entropy else logp


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    **loss_kwargs,
) -> tuple[torch.Tensor, dict]:
    """Loss and stats of ``fused_ppo_loss(hidden @ weight.T + bias, ...)`` for ``hidden[R, T, H]``.

    Log-probs and entropies come from the Triton pass above; the per-token PPO / KL / entropy terms and their
    aggregation are the reference's torch code on ``[R, T]`` vectors (O(R*T), identical stats), and the
    backward is the fused logit-gradient pass with those per-token gradients.
    """
    rows, steps = old_logp.shape
    logp, entropy = _LinearLogprobsFunction.apply(
        hidden.reshape(rows * steps, hidden.shape[-1]), weight, bias, labels.reshape(-1), float(temperature)
    )
    return policy_loss_terms(
        logp.view(rows, steps), entropy.view(rows, steps), old_logp, advantages, mask, **loss_kwargs
    )


KERNELS = {
    "linear_logprobs": linear_logprobs,
    "fused_linear_ppo_loss": fused_linear_ppo_loss,
}
