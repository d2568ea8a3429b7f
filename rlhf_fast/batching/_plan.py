"""Pure-Python micro-batch planner: the fallback, and the spec csrc/batcher_plan.cpp follows step for step.

1. Ranks: Karmarkar-Karp (``_kk.kk_partition``) of the per-sequence workload into ``num_ranks`` groups.
2. Fewest micro-batches per rank: with lb = ceil(tokens / max_tokens), a Karmarkar-Karp split into lb groups
   is optimal when every group fits; otherwise first-fit-decreasing. M = the largest count over the ranks
   (and at least ``min_micro_batches``), so every rank runs the same number of forward/backward steps.
3. Every rank is brought to M micro-batches: a Karmarkar-Karp split into M groups when it fits (balanced
   micro-batches), else its packing from step 2 with the heaviest splittable micro-batch halved (KK, k=2)
   until there are M, then balanced by the move/swap refinement of ``_kk`` (it only moves tokens from the
   heaviest micro-batch to a lighter one and never lifts the lighter one above the heaviest's old count, so
   the cap still holds). A micro-batch is empty only when a rank has fewer sequences than M (a KK split of
   at least k positive lengths leaves no group empty, see ``_kk``).
4. Order: heaviest micro-batch first on every rank. Ranks step through micro-batches in lockstep (FSDP /
   ZeRO collectives per step), so the j-th micro-batches of all ranks should cost about the same; sorting
   every rank the same way lines them up. Heaviest first also reaches the activation-memory peak on the first
   step, so a too-large ``max_tokens`` fails at once instead of midway.

Every step is near-linear in the number of sequences, whatever M is: KK is O(n log^2 n) (``_kk``), first-fit
finds each sequence's bin in a max-segment tree over the bins' free room, the halving picks the heaviest
splittable micro-batch from a heap, and token counts are computed once per micro-batch.
"""
from __future__ import annotations

import heapq

from ._kk import kk_partition, refine


def plan(lengths: list[int], rank_weights: list, max_tokens: int, num_ranks: int, equal_size: bool,
         min_micro_batches: int) -> list[list[list[int]]]:
    ranks = kk_partition(rank_weights, num_ranks, equal_size)
    bases = [_fewest(items, lengths, max_tokens) for items in ranks]
    count = max([len(b) for b, _ in bases] + [min_micro_batches])
    return [_order(_spread(items, base, from_kk, count, lengths, max_tokens), lengths, len(lengths))
            for items, (base, from_kk) in zip(ranks, bases)]


def _split(items: list[int], k: int, lengths: list[int]) -> list[list[int]]:
    """KK split of a sorted index list into k groups by tokens (none empty when there are >= k items)."""
    return [[items[p] for p in g] for g in kk_partition([lengths[i] for i in items], k, False)]


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
    """First fit, longest first. The bins' free room sits in the leaves of a max-segment tree with one leaf
    per item (a bin not opened yet has room cap), so the first bin with room is a walk down the tree."""
    leaves = 1
    while leaves < len(items):
        leaves *= 2
    room = [cap] * (2 * leaves)
    bins: list[list[int]] = []
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - leaves
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= need
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
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
    # Halve the heaviest splittable micro-batch (ties: the lowest index) until there are count of them.
    splittable = [(-_tokens(b, lengths), j) for j, b in enumerate(bins) if len(b) >= 2]
    heapq.heapify(splittable)
    while len(bins) < count:
        if not splittable:
            bins.append([])
            continue
        _, heaviest = heapq.heappop(splittable)
        first, second = _split(bins[heaviest], 2, lengths)
        bins[heaviest] = first
        bins.append(second)
        for j in (heaviest, len(bins) - 1):
            if len(bins[j]) >= 2:
                heapq.heappush(splittable, (-_tokens(bins[j], lengths), j))
    refine(lengths, bins, [_tokens(b, lengths) for b in bins], allow_moves=True, max_rounds=len(items))
    return [sorted(b) for b in bins]


def _order(micro_batches, lengths, sentinel):
    return sorted(micro_batches, key=lambda mb: (-_tokens(mb, lengths), mb[0] if mb else sentinel))


def _tokens(items, lengths) -> int:
    return sum(lengths[i] for i in items)
