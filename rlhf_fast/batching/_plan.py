"""Pure-Python micro-batch planner: the fallback, and the spec csrc/batcher_plan.cpp follows step for step.

1. Ranks: Karmarkar-Karp (``_kk.kk_partition``) of the per-sequence workload into ``num_ranks`` groups.
2. Fewest micro-batches per rank: with lb = ceil(tokens / max_tokens), a Karmarkar-Karp split into lb groups
   is optimal when every group fits; otherwise first-fit-decreasing. M = the largest count over the ranks
   (and at least ``min_micro_batches``), so every rank runs the same number of forward/backward steps.
3. Every rank is brought to M micro-batches: a Karmarkar-Karp split into M groups when it fits (balanced
   micro-batches), else its packing from step 2 with the heaviest splittable micro-batch halved (KK, k=2)
   until there are M, then balanced by the move/swap refinement of ``_kk`` (it only moves tokens from the
   heaviest micro-batch to a lighter one and never lifts the lighter one above the heaviest's old count, so
   the cap still holds). A micro-batch is empty only when a rank has fewer sequences than M.
4. Order: heaviest micro-batch first on every rank. Ranks step through micro-batches in lockstep (FSDP /
   ZeRO collectives per step), so the j-th micro-batches of all ranks should cost about the same; sorting
   every rank the same way lines them up. Heaviest first also reaches the activation-memory peak on the first
   step, so a too-large ``max_tokens`` fails at once instead of midway.
"""
from __future__ import annotations

from ._kk import kk_partition, refine


def plan(lengths: list[int], rank_weights: list, max_tokens: int, num_ranks: int, equal_size: bool,
         min_micro_batches: int) -> list[list[list[int]]]:
    ranks = kk_partition(rank_weights, num_ranks, equal_size)
    bases = [_fewest(items, lengths, max_tokens) for items in ranks]
    count = max([len(b) for b, _ in bases] + [min_micro_batches])
    return [_order(_spread(items, base, from_kk, count, lengths, max_tokens), lengths, len(lengths))
            for items, (base, from_kk) in zip(ranks, bases)]


def _split(items: list[int], k: int, lengths: list[int]) -> list[list[int]]:
    """KK split of a sorted index list into k groups by tokens, no group left empty when avoidable."""
    groups = [[items[p] for p in g] for g in kk_partition([lengths[i] for i in items], k, False)]
    _fill_empty(groups, lengths)
    return groups


def _fill_empty(groups: list[list[int]], lengths: list[int]) -> None:
    # Move the shortest sequence of the heaviest multi-sequence group into each empty group.
    while True:
        empty = next((g for g in range(len(groups)) if not groups[g]), None)
        donors = [g for g in range(len(groups)) if len(groups[g]) >= 2]
        if empty is None or not donors:
            return
        donor = max(donors, key=lambda g: (_tokens(groups[g], lengths), -g))
        shortest = min(groups[donor], key=lambda i: (lengths[i], i))
        groups[donor].remove(shortest)
        groups[empty].append(shortest)


def _fewest(items: list[int], lengths: list[int], cap: int):
    """(micro-batches, whether they are a KK split) of one rank: KK at the lower bound if it fits, else FFD."""
    if not items:
        return [], True
    lower_bound = -(-_tokens(items, lengths) // cap)
    groups = _split(items, lower_bound, lengths)
    if max(_tokens(g, lengths) for g in groups) <= cap:
        return groups, True
    return _first_fit_decreasing(items, lengths, cap), False


def _first_fit_decreasing(items: list[int], lengths: list[int], cap: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        for b in range(len(bins)):
            if room[b] >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(cap - lengths[i])
    return [sorted(b) for b in bins]


def _spread(items, base, from_kk, count, lengths, cap):
    if not items:
        return [[] for _ in range(count)]
    if from_kk and len(base) == count:
        return base
    groups = _split(items, count, lengths)
    if max(_tokens(g, lengths) for g in groups) <= cap:
        return groups
    bins = [list(b) for b in base]
    while len(bins) < count:
        splittable = [b for b in range(len(bins)) if len(bins[b]) >= 2]
        if not splittable:
            bins.append([])
            continue
        heaviest = max(splittable, key=lambda b: (_tokens(bins[b], lengths), -b))
        first, second = _split(bins[heaviest], 2, lengths)
        bins[heaviest] = first
        bins.append(second)
    refine(lengths, bins, [_tokens(b, lengths) for b in bins], allow_moves=True, max_rounds=len(items))
    return [sorted(b) for b in bins]


def _order(micro_batches, lengths, sentinel):
    return sorted(micro_batches, key=lambda mb: (-_tokens(mb, lengths), mb[0] if mb else sentinel))


def _tokens(items, lengths) -> int:
    return sum(lengths[i] for i in items)
