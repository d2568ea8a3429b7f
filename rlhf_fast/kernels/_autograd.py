"""Shared autograd helpers of the Triton ``torch.autograd.Function`` classes."""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable


def first_order_only(backward):
    """Decorate a Function's ``backward``: first-order gradients only, and a clear error on double backward.

    The Triton backward kernels compute first-order gradients with no autograd graph of their own. Without this,
    ``create_graph=True`` would silently return first-order gradients that do not require grad (second-order
    terms dropped). The engine runs ``backward`` with grad mode on exactly when ``create_graph=True``, so that
    is refused here at once; ``once_differentiable`` runs the body under ``no_grad`` and guards any other route
    (gradients that require grad) with autograd's own "differentiate twice" error.
    """
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            name = type(ctx).__name__.removesuffix("Backward")
            raise RuntimeError(
                f"{name}: the Triton kernels of rlhf_fast support first-order gradients only; double backward "
                "(create_graph=True) is not supported. Use RLHF_FAST_BACKEND=torch for higher-order gradients."
            )
        return inner(ctx, *grads)

    return wrapper
