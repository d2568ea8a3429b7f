"""Critic-free advantages and reward shaping of the GRPO family (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO).

Inputs are the step's whole batch, ``num_generations`` consecutive rows per prompt (a group):
- ``group_advantages``: one advantage per sequence from the sequence rewards ``[B]``;
- ``reinforce_pp_advantages``: per-token returns normalised over the whole batch (REINFORCE++);
- ``overlong_penalty``: DAPO's soft punishment of responses that run into the length limit;
- ``informative_groups``: DAPO's dynamic-sampling filter (groups whose rewards are not all equal).
"""
from __future__ import annotations

import torch

from .. import ops

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the standard deviation (TRL's GRPO)


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str, scale_rewards: str = "group"):
    """``[B]`` sequence advantages.

    - ``grpo``: ``r - mean(group)``, divided by the group's standard deviation (``scale_rewards="group"``, Shao et
      al. 2024), by the whole batch's (``"batch"``, Hu et al. 2025's robust variant, TRL's ``"batch"``) or by
      nothing (``"none"``: Dr. GRPO, Liu et al. 2025, with ``loss_agg: seq-mean-token-sum-norm``). Standard
      deviations are unbiased, plus ``1e-4``.
    - ``rloo``: ``r`` minus the mean of the other samples of the same prompt (Ahmadian et al. 2024).
    """
    groups = rewards.view(-1, group_size)
    if estimator == "rloo":
        others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).reshape(-1)
    if estimator != "grpo":
        raise ValueError(f"estimator: expected 'grpo' or 'rloo', got {estimator!r}")
    centred = groups - groups.mean(-1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (groups.std(-1, keepdim=True) + STD_EPS)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards: expected one of {list(SCALE_REWARDS)}, got {scale_rewards!r}")
    return centred.reshape(-1)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, OpenRLHF's ``reinforce_plus_plus``): the discounted return of every response
    token, ``G_t = sum_k gamma^k r_{t+k}`` over the row's valid tokens, whitened over all valid tokens of the batch
    (the global batch normalisation that replaces the critic). ``ops.gae`` with zero values and ``lam = 1`` is
    exactly that return."""
    returns, _ = ops.gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0)
    return ops.masked_whiten(returns, mask)


def overlong_penalty(response_lengths: torch.Tensor, max_length: int, buffer_length: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to the reward: 0 up to ``max_length - buffer``
    tokens, then falling linearly to ``-factor`` at ``max_length`` (and ``-factor`` beyond)."""
    expected = max_length - buffer_length
    over = (response_lengths.float() - expected).clamp(min=0.0)
    return -factor * (over / buffer_length).clamp(max=1.0)


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B / group_size]`` bool: groups whose scores are not all equal (DAPO's dynamic sampling keeps those; a
    group of equal rewards has zero GRPO advantage and only dilutes the batch)."""
    groups = scores.view(-1, group_size)
    return (groups != groups[:, :1]).any(-1)
