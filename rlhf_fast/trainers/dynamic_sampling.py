"""Scored rollouts as groups, and DAPO's dynamic sampling over them.

A ``ScoredRollout`` holds ``num_generations`` consecutive rows per prompt: the generation, the decoded
completions, the per-reward-function table and the final score of each row. ``fill_batch`` keeps the groups whose
scores are not all equal and samples more prompts until the batch is full again (Yu et al. 2025, DAPO), at most
``max_rounds`` extra rounds; a batch still short then is topped up with the dropped groups (so the batch size, and
the minibatch split, never change), and the metrics say how many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .advantages import informative_groups
from ..rollout.generation import Generation


@dataclass
class ScoredRollout:
    prompt_indices: list[int]  # one per group
    gen: Generation
    completions: list[str]
    reward_parts: torch.Tensor  # [B, F], NaN where a function gave None
    scores: torch.Tensor  # [B]
    group_size: int
    time_score: float = 0.0  # seconds spent scoring (set by the trainer)

    def groups(self, chosen: list[int]) -> "ScoredRollout":
        """The rollout of groups ``chosen`` (group positions), in that order."""
        rows = [g * self.group_size + k for g in chosen for k in range(self.group_size)]
        index = torch.tensor(rows, dtype=torch.long, device=self.scores.device)
        logprobs = None if self.gen.logprobs is None else [self.gen.logprobs[r] for r in rows]
        gen = Generation([self.gen.prompt_ids[r] for r in rows], [self.gen.response_ids[r] for r in rows],
                         [self.gen.stopped[r] for r in rows], logprobs)
        return ScoredRollout([self.prompt_indices[g] for g in chosen], gen, [self.completions[r] for r in rows],
                             self.reward_parts[index], self.scores[index], self.group_size)

    @staticmethod
    def concat(parts: list["ScoredRollout"]) -> "ScoredRollout":
        first = parts[0]
        logprobs = (None if any(r.gen.logprobs is None for r in parts)  # engine log-probs: all rounds or none
                    else [lp for r in parts for lp in r.gen.logprobs])
        gen = Generation([p for r in parts for p in r.gen.prompt_ids], [p for r in parts for p in r.gen.response_ids],
                         [s for r in parts for s in r.gen.stopped], logprobs)
        return ScoredRollout([i for r in parts for i in r.prompt_indices], gen, [c for r in parts for c in r.completions],
                             torch.cat([r.reward_parts for r in parts]), torch.cat([r.scores for r in parts]),
                             first.group_size)


def fill_batch(first: ScoredRollout, sample_more: Callable[[int], ScoredRollout],
               max_rounds: int) -> tuple[ScoredRollout, dict]:
    """Keep ``first``'s informative groups and call ``sample_more(round)`` (round = 1, 2, ...) until as many groups
    as ``first`` has are informative or ``max_rounds`` extra rounds ran; returns the batch and its metrics."""
    wanted = len(first.prompt_indices)
    kept, dropped = [], []
    sampled = 0
    rollout, rounds = first, 0
    while True:
        informative = informative_groups(rollout.scores, rollout.group_size).tolist()
        sampled += len(informative)
        kept.append(rollout.groups([g for g, keep in enumerate(informative) if keep]))
        dropped.append(rollout.groups([g for g, keep in enumerate(informative) if not keep]))
        have = sum(len(r.prompt_indices) for r in kept)
        if have >= wanted or rounds >= max_rounds:
            break
        rounds += 1
        rollout = sample_more(rounds)
    batch = ScoredRollout.concat(kept)
    informative_count = len(batch.prompt_indices)
    filled = max(0, wanted - informative_count)
    if filled:
        batch = ScoredRollout.concat([batch, ScoredRollout.concat(dropped).groups(list(range(filled)))])
    batch = batch.groups(list(range(wanted)))
    metrics = {"dynamic_sampling/rounds": float(rounds),
               "dynamic_sampling/informative_frac": informative_count / max(1, sampled),
               "dynamic_sampling/filled_groups": float(filled)}
    return batch, metrics
