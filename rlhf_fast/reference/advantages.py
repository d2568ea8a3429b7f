"""Reference GAE (the per-timestep loop every RLHF library starts from) and masked whitening."""
from __future__ import annotations

import torch

from ._precision import upcast


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-aware GAE over ``[B, T]``: tokens with mask 0 are skipped, not zeroed into the recursion.

    For each valid ``t`` with ``t'`` the next valid token of its row: ``delta_t = r_t + gamma * V_t' - V_t``,
    ``A_t = delta_t + gamma * lam * A_t'`` (both ``t'`` terms 0 at the end of the row), ``R_t = A_t + V_t``.
    Masked positions get 0. Outputs are float32.
    """
    rewards, values = upcast(rewards), upcast(values)
    valid = mask.bool()
    rows, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rows)
    next_advantage = rewards.new_zeros(rows)
    for t in reversed(range(steps)):
        keep = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + (gamma * lam) * next_advantage
        advantages[:, t] = torch.where(keep, advantage, 0.0)
        next_advantage = torch.where(keep, advantage, next_advantage)
        next_value = torch.where(keep, values[:, t], next_value)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over positions with mask 1, with the unbiased variance.

    With ``shift_mean=False`` the mean is added back. Outputs are 0 where mask is 0. With fewer than two valid
    positions the unbiased variance is undefined; it is taken as 0 (so the output is ``(x - mean) / sqrt(eps)``
    = 0 for one position) instead of dividing by zero.
    """
    valid = mask != 0
    x = torch.where(valid, upcast(x), 0.0)  # select, not multiply: nan / inf under the mask stay out
    count = valid.sum()
    mean = x.sum() / count.clamp(min=1)
    centred = torch.where(valid, x - mean, 0.0)
    var = (centred * centred).sum() / (count - 1).clamp(min=1)
    y = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(valid, y, 0.0)
