"""Truncated importance sampling (TIS) between the rollout engine and the trainer.

The engine samples from its own copy of the policy (other kernels, precision and batching: vLLM's log-probs are
not the trainer's). The PPO ratio keeps the trainer's recomputed log-probs as ``old_logp``; the correction for
having sampled from the engine instead is a per-token weight ``min(exp(trainer_logp - engine_logp), cap)``
(Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL training"), passed to the loss
ops as ``is_weights``.
"""
from __future__ import annotations

import torch


def importance_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *,
                       cap: float) -> torch.Tensor:
    """``[B, T]`` truncated importance weights ``min(exp(trainer_logp - engine_logp), cap)`` on ``mask``, 1
    elsewhere (positions outside the mask carry no loss; a weight of 1 keeps them neutral)."""
    if not cap > 0:
        raise ValueError(f"cap: expected a positive value, got {cap!r}")
    if trainer_logp.shape != engine_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(f"engine_logp: expected the shape of trainer_logp and mask {tuple(trainer_logp.shape)}, "
                         f"got engine_logp {tuple(engine_logp.shape)} and mask {tuple(mask.shape)}")
    ratio = torch.exp((trainer_logp - engine_logp).float()).clamp(max=cap)
    return torch.where(mask > 0, ratio, torch.ones_like(ratio))


def mismatch_metrics(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *,
                     cap: float) -> dict[str, float]:
    """How far the engine's sampling log-probs are from the trainer's, over the masked (response) tokens:

    - ``engine_logp_diff_mean`` / ``engine_logp_diff_max``: mean / max of ``|trainer_logp - engine_logp|``;
    - ``engine_kl``: KL(engine || trainer) estimated on the engine's samples, the mean of
      ``engine_logp - trainer_logp`` (k1; its expectation is the KL);
    - ``engine_is_truncated_frac``: the fraction of tokens whose ratio ``exp(trainer - engine)`` exceeds ``cap``.
    """
    valid = mask > 0
    count = max(1, int(valid.sum()))
    diff = (engine_logp - trainer_logp).float()[valid]
    if diff.numel() == 0:
        return {"engine_logp_diff_mean": 0.0, "engine_logp_diff_max": 0.0, "engine_kl": 0.0,
                "engine_is_truncated_frac": 0.0}
    return {
        "engine_logp_diff_mean": float(diff.abs().sum() / count),
        "engine_logp_diff_max": float(diff.abs().max()),
        "engine_kl": float(diff.sum() / count),
        "engine_is_truncated_frac": float((torch.exp(-diff) > cap).float().sum() / count),
    }


def per_token_engine_logp(prompt_lens: list[int], logprobs: list[list[float]], width: int,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """The engine's per-response-token log-probs laid out like the trainer's ``[B, width]`` label positions
    (``trainers.rollout.response_mask``): response token ``j`` of a prompt of length ``p`` is the label at
    position ``p - 1 + j``; with an empty prompt the first response token has no position and is dropped."""
    out = torch.zeros((len(prompt_lens), width), dtype=torch.float32)
    for row, (p, values) in enumerate(zip(prompt_lens, logprobs)):
        skip = 1 if p == 0 else 0
        values = values[skip:]
        start = max(p - 1, 0)
        if values:
            out[row, start:start + len(values)] = torch.tensor(values, dtype=torch.float32)
    return out.to(device)
