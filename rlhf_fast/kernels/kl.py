"""Per-token KL estimators (k1 / k2 / k3) of KL(pi || ref): forward and backward Triton kernels.

Elementwise over the flattened tensors; the backward recomputes ``dkl/dlogp`` from the inputs instead of saving it.
Gradients: ``logp`` gets ``g * dkl``; ``ref_logp`` (only when it requires grad) gets ``-g * dkl``, as autograd on the
reference would give.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only
from ._ppo_math import ESTIMATOR_CODES, kl_token

BLOCK = 1024


@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, out_ptr, n, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    kl, _ = kl_token(logp, ref, ESTIMATOR)
    tl.store(out_ptr + offs, kl, mask=inside)


@triton.jit
def _kl_bwd_kernel(
    grad_out_ptr, logp_ptr, ref_ptr, grad_logp_ptr, grad_ref_ptr, n,
    ESTIMATOR: tl.constexpr, HAS_LOGP_GRAD: tl.constexpr, HAS_REF_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(grad_out_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    _, dkl = kl_token(logp, ref, ESTIMATOR)
    grad = g * dkl
    if HAS_LOGP_GRAD:
        tl.store(grad_logp_ptr + offs, grad.to(grad_logp_ptr.dtype.element_ty), mask=inside)
    if HAS_REF_GRAD:
        tl.store(grad_ref_ptr + offs, (-grad).to(grad_ref_ptr.dtype.element_ty), mask=inside)


class TokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, estimator):
        code = ESTIMATOR_CODES[estimator]
        shape = logp.shape
        lp, rf = logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous()
        n = lp.numel()
        out = torch.empty(n, dtype=torch.float32, device=logp.device)
        if n:
            _kl_fwd_kernel[(triton.cdiv(n, BLOCK),)](lp, rf, out, n, ESTIMATOR=code, BLOCK=BLOCK)
        ctx.save_for_backward(lp, rf)
        ctx.code, ctx.shape = code, shape
        return out.view(shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        lp, rf = ctx.saved_tensors
        need_logp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_out.reshape(-1).contiguous()
        n = lp.numel()
        grad_logp = torch.empty_like(lp) if need_logp else None
        grad_ref = torch.empty_like(rf) if need_ref else None
        if n and (need_logp or need_ref):
            _kl_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                g, lp, rf, grad_logp if need_logp else lp, grad_ref if need_ref else rf, n,
                ESTIMATOR=ctx.code, HAS_LOGP_GRAD=need_logp, HAS_REF_GRAD=need_ref, BLOCK=BLOCK,
            )
        shape = ctx.shape
        return (
            None if grad_logp is None else grad_logp.view(shape),
            None if grad_ref is None else grad_ref.view(shape),
            None,
        )


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Triton ``token_kl`` (any shape, float32 output); same signature and numbers as the reference."""
    if estimator not in ESTIMATOR_CODES:
        raise ValueError(f"estimator: expected one of {list(ESTIMATOR_CODES)}, got {estimator!r}")
    return TokenKL.apply(logp, ref_logp, estimator)


KERNELS = {"token_kl": token_kl}
