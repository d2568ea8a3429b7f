"""The distribution the rollouts are sampled from, when ``top_k`` / ``top_p`` truncate it.

``generate`` samples from the softmax of the logits after temperature, top-k and top-p (``transformers``' own
warpers, in that order), renormalised over the kept tokens. Log-probs of the full softmax would make "on-policy"
PPO off-policy by the truncation (the ratio at the old parameters would be the kept mass, not 1, and the KL and the
entropy would be of another distribution). So with truncation the trainer takes the truncated, renormalised
distribution as the policy everywhere: the old log-probs, the training forward's log-probs (hence the ratio), the
KL to the reference and the entropy all come from ``truncate_logits``' logits, which run the very warpers
``generate`` uses. The kept set is recomputed from the logits at hand (the set is piecewise constant in the
parameters, so no gradient flows through it); at the old parameters it is the set that was sampled from.
"""
from __future__ import annotations

import torch

# Tokens outside the kept set are pushed this far below (in units of the temperature): exp(-1e4) is exactly 0 in
# float32, and, unlike -inf, the value keeps p * log p (the entropy) and every kernel's arithmetic finite.
DROP = 1.0e4


def truncates(top_p: float, top_k: int) -> bool:
    """Whether sampling with these settings draws from a truncated distribution."""
    return top_p < 1.0 or top_k > 0


def kept_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """``[*, V]`` bool: the tokens ``generate``'s temperature, top-k and top-p warpers keep."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scores = logits.detach().reshape(-1, logits.shape[-1]).float() / temperature
    if top_k > 0:
        scores = TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)(None, scores)
    return torch.isfinite(scores).view(logits.shape)


def truncate_logits(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """``logits`` whose softmax at ``temperature`` is the sampling distribution: the dropped tokens get probability
    exactly 0 and the kept ones are renormalised. Differentiable (identity on the kept tokens); a new tensor."""
    if not truncates(top_p, top_k):
        return logits
    kept = kept_tokens(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    return logits - (~kept).to(logits.dtype) * (DROP * temperature)
