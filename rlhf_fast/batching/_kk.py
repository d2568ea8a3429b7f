"""Pure-Python Karmarkar-Karp k-way partition: the fallback, and the spec the C++ code (csrc/batcher_kk.cpp)
follows operation for operation, so that both give the same groups bit for bit.

Algorithm (multi-way largest differencing):
1. Every item starts as a state of k partial sums (the item alone in one group, the other groups empty);
   with ``equal_size`` the items sorted by (weight, index) are cut into chunks of k, and each chunk is a state
   with one item per group, so every group always holds the same number of items.
2. Repeatedly take the two states with the largest spread (max - min partial sum; ties: the older state, by
   id) and merge them, pairing group i of the first with group k-1-i of the second (largest with smallest);
   the merged groups are re-sorted by sum, descending, stably; the merged state gets the next id.
3. Refinement: while the heaviest and the lightest group can be brought closer by moving one item from the
   heaviest to the lightest (not with ``equal_size``) or by swapping a pair, apply the best such change
   (the one whose difference d is nearest to half the gap; ties: lowest item indices). Each change lowers the
   sum of squared group sums, so it stops; the maximum never rises and the minimum never falls, so the result
   is never worse than plain Karmarkar-Karp.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left


def kk_partition(weights: list, k: int, equal_size: bool) -> list[list[int]]:
    """Groups of indices into ``weights`` (each sorted ascending), in the order of the final state's groups."""
    n = len(weights)
    zero = weights[0] * 0 if n else 0
    heap = []
    if equal_size:
        order = sorted(range(n), key=lambda i: (weights[i], i))
        for chunk_id in range(n // k):
            chunk = order[chunk_id * k : (chunk_id + 1) * k][::-1]  # descending by (weight, index)
            sums = [weights[i] for i in chunk]
            heap.append((-(sums[0] - sums[-1]), chunk_id, sums, [[i] for i in chunk]))
        next_id = n // k
    else:
        for i in range(n):
            sums = [weights[i]] + [zero] * (k - 1)
            groups = [[i]] + [[] for _ in range(k - 1)]
            heap.append((-(sums[0] - sums[-1]), i, sums, groups))
        next_id = n
    heapq.heapify(heap)
    while len(heap) > 1:
        _, _, sums_a, groups_a = heapq.heappop(heap)
        _, _, sums_b, groups_b = heapq.heappop(heap)
        merged_sums = [sums_a[i] + sums_b[k - 1 - i] for i in range(k)]
        merged_groups = [_union(groups_a[i], groups_b[k - 1 - i]) for i in range(k)]
        order = sorted(range(k), key=merged_sums.__getitem__, reverse=True)  # stable for equal sums
        sums = [merged_sums[j] for j in order]
        groups = [merged_groups[j] for j in order]
        heapq.heappush(heap, (-(sums[0] - sums[-1]), next_id, sums, groups))
        next_id += 1
    if not heap:
        return [[] for _ in range(k)]
    _, _, sums, groups = heap[0]
    groups = [list(g) for g in groups]
    refine(weights, groups, list(sums), allow_moves=not equal_size, max_rounds=n)
    return [sorted(g) for g in groups]


def _union(a: list, b: list) -> list:
    # Extend the longer list with the shorter: item order inside a group does not matter (sorted at the end).
    if len(a) < len(b):
        a, b = b, a
    a.extend(b)
    return a


def refine(weights, groups, sums, *, allow_moves: bool, max_rounds: int) -> None:
    """Move/swap items from the heaviest to the lightest group while that narrows their gap (in place)."""
    for _ in range(max_rounds):
        heavy = sums.index(max(sums))
        light = sums.index(min(sums))
        gap = sums[heavy] - sums[light]
        if not gap > 0:
            return
        best = _best_change(weights, groups[heavy], groups[light], gap, allow_moves)
        if best is None:
            return
        _, x, y = best
        groups[heavy].remove(x)
        groups[light].append(x)
        d = weights[x]
        if y >= 0:
            groups[light].remove(y)
            groups[heavy].append(y)
            d = weights[x] - weights[y]
        sums[heavy] = sums[heavy] - d
        sums[light] = sums[light] + d


def _best_change(weights, heavy, light, gap, allow_moves):
    """(|2d - gap|, x, y) of the best move (y = -1) or swap that narrows the gap, or None."""
    best = None
    if allow_moves:
        for x in heavy:
            d = weights[x]
            if 0 < d < gap:
                candidate = (abs(2 * d - gap), x, -1)
                if best is None or candidate < best:
                    best = candidate
    ordered = sorted(light, key=lambda y: (weights[y], y))
    doubled = [2 * weights[y] for y in ordered]
    for x in heavy:
        target = 2 * weights[x] - gap  # the swap is ideal when 2 * w[y] == target
        above = bisect_left(doubled, target)
        for p in (above, above - 1):
            if 0 <= p < len(doubled):
                y = ordered[bisect_left(doubled, doubled[p])]  # lowest index among equal weights
                d = weights[x] - weights[y]
                if 0 < d < gap:
                    candidate = (abs(2 * d - gap), x, y)
                    if best is None or candidate < best:
                        best = candidate
    return best
