"""Per-token PPO math shared by the loss kernels (``losses.py``) and the fused loss from logits (``fused_loss.py``).

Both helpers work on one block of tokens held in registers, fp32 in and fp32 out, and reproduce the reference
(`rlhf_fast.reference.losses.ppo_policy_loss`, `rlhf_fast.reference.kl.token_kl`) operation for operation,
including the gradient torch autograd picks at ties:

- ``torch.maximum(a, b)`` sends half the gradient to each side when ``a == b`` (this is the common case: inside the
  clip range the clipped and unclipped terms are the same number);
- ``torch.clamp(x, lo, hi)`` passes the gradient for ``lo <= x <= hi`` (both ends inclusive);
- ``torch.where(cond, a, b)`` sends it to the chosen side only.

Masking, per-token weights and importance weights are the caller's business: these return unweighted terms.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def policy_token_loss(logp, old_logp, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    """Clipped PPO surrogate for one block of tokens.

    ``logp``, ``old_logp``, ``adv``: fp32 blocks. ``clip_low``, ``clip_high``, ``dual_clip``: scalars (runtime fp32
    arguments or constexpr; ``dual_clip`` is ignored unless ``HAS_DUAL``). Returns fp32 blocks
    ``(loss, dloss_dlogp, clipped, dual_capped)``:

    - ``loss = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))`` with ``r = exp(logp - old_logp)``, and with
      ``HAS_DUAL`` for ``A < 0`` and ``-A c < loss``: ``loss = -A c``;
    - ``dloss_dlogp``: the gradient torch autograd gives the reference (ties split as ``torch.maximum`` does);
    - ``clipped``: 1.0 where the clipped term is strictly greater than the unclipped one (the reference's
      ``clip_frac`` numerator), else 0.0;
    - ``dual_capped``: 1.0 where the dual clip replaced the loss (always 0.0 without ``HAS_DUAL``).
    """
    ratio = tl.exp(logp - old_logp)
    neg_adv = -adv
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    ratio_c = tl.minimum(tl.maximum(ratio, lo), hi).to(tl.float32)
    unclipped = neg_adv * ratio
    clipped_term = neg_adv * ratio_c
    loss = tl.maximum(unclipped, clipped_term)
    # d/dlogp of each branch: d ratio / d logp = ratio; clamp passes the gradient on the closed interval.
    g_unclipped = neg_adv * ratio
    in_range = (ratio >= lo) & (ratio <= hi)
    g_clipped = tl.where(in_range, g_unclipped, 0.0)
    grad = tl.where(
        unclipped > clipped_term,
        g_unclipped,
        tl.where(clipped_term > unclipped, g_clipped, 0.5 * g_unclipped + 0.5 * g_clipped),
    )
    clipped = tl.where(clipped_term > unclipped, 1.0, 0.0)
    if HAS_DUAL:
        cap = (neg_adv * dual_clip).to(tl.float32)
        capped = (adv < 0.0) & (cap < loss)
        loss = tl.where(capped, cap, loss)
        grad = tl.where(capped, 0.0, grad)
        dual_capped = tl.where(capped, 1.0, 0.0)
    else:
        dual_capped = tl.zeros_like(loss)
    return loss, grad, clipped, dual_capped


@triton.jit
def kl_token(logp, ref_logp, ESTIMATOR: tl.constexpr):
    """Per-token KL(pi || ref) estimate and its derivative with respect to ``logp``, fp32 blocks.

    ``ESTIMATOR``: 1 = k1 ``r``, 2 = k2 ``r^2 / 2``, 3 = k3 ``exp(-r) - 1 + r``, with ``r = logp - ref_logp``.
    """
    r = logp - ref_logp
    if ESTIMATOR == 1:
        kl = r
        dkl = tl.zeros_like(r) + 1.0
    elif ESTIMATOR == 2:
        kl = 0.5 * r * r
        dkl = r
    else:
        e = tl.exp(-r)
        kl = e - 1.0 + r
        dkl = 1.0 - e
    return kl, dkl


ESTIMATOR_CODES = {"k1": 1, "k2": 2, "k3": 3}
