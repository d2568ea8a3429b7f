"""Reference log-probs straight from hidden states and the LM head, in chunks of tokens.

Neither the forward nor the backward ever holds more than ``TOKEN_CHUNK`` rows of logits: the backward
recomputes each chunk's logits, the way the fused kernels do.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._precision import upcast
from .losses import policy_loss_terms

TOKEN_CHUNK = 1024


def _chunk_logits(hidden, weight, bias, temperature):
    """A fresh float32 (float64) ``[chunk, V]`` logits tensor, so callers may work on it in place."""
    z = upcast(hidden @ weight.t())
    if bias is not None:
        z += upcast(bias)
    return z.div_(temperature) if temperature != 1.0 else z


def _zero_neg_inf_(z: torch.Tensor) -> torch.Tensor:
    """``finite_or_zero`` in place: -inf -> 0, so that ``p * z`` is 0 where ``p`` is 0."""
    return z.masked_fill_(torch.isneginf(z), 0.0)


# Each chunk works in place wherever the math allows, so at most two [chunk, V] float32 tensors are alive at
# once (the logits and the probabilities / gradient): that bound is what the op's memory promise rests on.
class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk):
        n = hidden.shape[0]
        acc = upcast(hidden[:0]).dtype  # float32, or float64 for float64 inputs
        logp = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s : s + chunk], weight, bias, temperature)
            chunk_lse = torch.logsumexp(z, dim=-1)
            p = (z - chunk_lse.unsqueeze(-1)).exp_()
            lse[s : s + chunk] = chunk_lse
            logp[s : s + chunk] = z.gather(-1, labels[s : s + chunk].long().unsqueeze(-1)).squeeze(-1) - chunk_lse
            entropy[s : s + chunk] = chunk_lse - p.mul_(_zero_neg_inf_(z)).sum(-1)
            del z, p
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an unused output gets None, not zeros (see the entropy term below)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros_like(bias, dtype=lse.dtype)
        g_lp = grad_logp if grad_logp is not None else torch.zeros_like(lse)
        g_h = grad_entropy if grad_entropy is not None else torch.zeros_like(lse)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            log_p = _chunk_logits(h, weight, bias, temperature).sub_(lse[s : s + chunk].unsqueeze(-1))
            gz = torch.exp(log_p)  # p, then the gradient in place
            # d logp_y / dz = onehot(y) - p ;  dH / dz = -p * (log p + H)
            if grad_entropy is None:  # no entropy term: 0 * a nan entropy (a +inf logit) would be nan
                gz.mul_(-g_lp[s : s + chunk].unsqueeze(-1))
            else:  # coef = g_lp + g_h * (log p + H), built in log_p's storage
                _zero_neg_inf_(log_p).add_(entropy[s : s + chunk].unsqueeze(-1))
                log_p.mul_(g_h[s : s + chunk].unsqueeze(-1)).add_(g_lp[s : s + chunk].unsqueeze(-1))
                gz.mul_(log_p).neg_()
            del log_p
            gz.scatter_add_(-1, labels[s : s + chunk].long().unsqueeze(-1), g_lp[s : s + chunk].unsqueeze(-1))
            if temperature != 1.0:
                gz.div_(temperature)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = (gz @ upcast(weight)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += gz.t() @ upcast(h)
            if grad_bias is not None:
                grad_bias += gz.sum(0)
            del gz
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = TOKEN_CHUNK,
):
    """``selective_log_softmax(hidden @ weight.T + bias, labels)`` for ``hidden[N, H]``, chunked over tokens."""
    logp, entropy = _LinearLogprobs.apply(hidden, weight, bias, labels, float(temperature), int(chunk_size))
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
    """The loss of ``fused_ppo_loss(hidden @ weight.T + bias, ...)`` without the ``[N, V]`` logits."""
    rows, steps = old_logp.shape
    logp, entropy = linear_logprobs(
        hidden.reshape(rows * steps, hidden.shape[-1]), weight, labels.reshape(-1), bias=bias, temperature=temperature,
        return_entropy=True,
    )
    return policy_loss_terms(
        logp.view(rows, steps), entropy.view(rows, steps), old_logp, advantages, mask, **loss_kwargs
    )
