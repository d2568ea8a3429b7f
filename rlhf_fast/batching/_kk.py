"""Pure-Python Karmarkar-Karp k-way partition: the fallback, and the spec the C++ code (csrc/batcher_kk.cpp)
follows operation for operation, so that both give the same groups bit for bit.

Algorithm (multi-way largest differencing):
1. Every item starts as a state of k partial sums (the item alone in one group, the other groups empty);
   with ``equal_size`` the items sorted by (weight, index) are cut into chunks of k, and each chunk is a state
   with one item per group, so every group always holds the same number of items.
2. Repeatedly take the two states with the largest spread (max - min partial sum; ties: the older state, by
   id) and merge them, pairing the i-th heaviest group of the first with the i-th lightest of the second; the
   merged state gets the next id.
3. Refinement: while the heaviest and the lightest group can be brought closer by moving one item from the
   heaviest to the lightest (not with ``equal_size``) or by swapping a pair, apply the best such change
   (the one whose difference d is nearest to half the gap; ties: lowest item indices). Each change lowers the
   sum of squared group sums, so it stops; the maximum never rises and the minimum never falls, so the result
   is never worse than plain Karmarkar-Karp.

Sparse states. A state keeps only its non-empty groups, at most min(k, items): the empty ones are zeros at the
end of its order. Pairing the i-th heaviest group of one state with the i-th lightest of the other then only
joins the o = p + q - k lightest non-empty groups of both (p, q: their non-empty counts); every other group
passes through unchanged. So a merge pops the o lightest groups of each state, joins them, and moves the
groups of the state with fewer into the other. Each state holds its groups in two heaps, lightest first (to
pop) and heaviest first (for the spread; joined groups are dropped from it lazily). A group is moved only
into a state at least as large, so it moves O(log n) times: O(n log^2 n) time and O(n) memory for any k (a
dense k-vector per state costs O(n k) of both, which a plan with thousands of micro-batches cannot afford).

Groups are ordered by (sum descending, id ascending): a group starts with its item's index as id, a joined
group takes the next fresh id (from n on). The states' sums, hence the merge order and the final sums, are
exactly those of textbook largest differencing; only which of two equal-sum groups is joined is fixed by this
order. The final groups come out in that order (empty groups last), then refined.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left


class _Groups:
    """Every group ever formed: its sum, whether it was joined into another, and its items as a linked list."""

    def __init__(self, weights: list):
        n = len(weights)
        self.sums = list(weights)
        self.joined = [False] * n
        self.head = list(range(n))
        self.tail = list(range(n))
        self.next = [-1] * n  # per item

    def join(self, x: int, y: int) -> int:
        """A new group holding the items of x then y (both retired); returns its id."""
        self.joined[x] = self.joined[y] = True
        self.next[self.tail[x]] = self.head[y]
        self.sums.append(self.sums[x] + self.sums[y])
        self.joined.append(False)
        self.head.append(self.head[x])
        self.tail.append(self.tail[y])
        return len(self.sums) - 1

    def items(self, g: int) -> list[int]:
        out, item = [], self.head[g]
        while True:
            out.append(item)
            if item == self.tail[g]:
                return out
            item = self.next[item]


class _State:
    """The non-empty groups of one state: ``light`` a heap of (sum, -id) (lightest, then highest id, first:
    the last group in the state's order), ``heavy`` a heap of (-sum, id) that may still hold joined groups."""

    __slots__ = ("light", "heavy")

    def __init__(self, groups: _Groups, ids):
        self.light = [(groups.sums[g], -g) for g in ids]
        self.heavy = [(-groups.sums[g], g) for g in ids]
        heapq.heapify(self.light)
        heapq.heapify(self.heavy)

    def add(self, groups: _Groups, g: int) -> None:
        heapq.heappush(self.light, (groups.sums[g], -g))
        heapq.heappush(self.heavy, (-groups.sums[g], g))

    def pop_lightest(self, count: int) -> list[int]:
        return [-heapq.heappop(self.light)[1] for _ in range(count)]

    def spread(self, groups: _Groups, k: int, zero):
        while groups.joined[self.heavy[0][1]]:
            heapq.heappop(self.heavy)
        heaviest = groups.sums[self.heavy[0][1]]
        lightest = self.light[0][0] if len(self.light) == k else zero
        return heaviest - lightest


def _merge(groups: _Groups, a: _State, b: _State, k: int) -> _State:
    """The state merging a (served first) with b: its i-th heaviest group joined with b's i-th lightest."""
    overlap = max(0, len(a.light) + len(b.light) - k)
    a_low = a.pop_lightest(overlap)  # lightest first: a's (p-1)-th, (p-2)-th, ... group
    b_low = b.pop_lightest(overlap)
    # a's j-th lightest of the overlap pairs with b's j-th heaviest of it (group i with group k-1-i).
    joined = [groups.join(x, y) for x, y in zip(reversed(a_low), b_low)]
    big, small = (a, b) if len(a.light) >= len(b.light) else (b, a)
    for _, negative_id in small.light:
        big.add(groups, -negative_id)
    for g in joined:
        big.add(groups, g)
    return big


def kk_partition(weights: list, k: int, equal_size: bool) -> list[list[int]]:
    """Groups of indices into ``weights`` (each sorted ascending), in the order of the final state's groups."""
    n = len(weights)
    if n == 0:
        return [[] for _ in range(k)]
    zero = weights[0] * 0
    groups = _Groups(weights)
    if equal_size:
        order = sorted(range(n), key=lambda i: (weights[i], i))
        initial = []
        for chunk_id in range(n // k):
            state = _State(groups, order[chunk_id * k : (chunk_id + 1) * k])
            initial.append((-state.spread(groups, k, zero), chunk_id, state))
        next_id = n // k
    else:
        # A one-item state is its item's index until it is merged (a state object per item costs memory).
        initial = [(-(weights[i] - (weights[i] if k == 1 else zero)), i, i) for i in range(n)]
        next_id = n
    # The initial states are served from a sorted list, the merged ones from a heap: the next state served is
    # the first of the two, exactly as from one heap of all (a merged state never goes back to the list).
    initial.sort()  # (-spread, id) are unique: the states themselves are never compared
    next_initial = 0
    heap = []

    def serve():
        nonlocal next_initial
        if next_initial < len(initial) and (not heap or initial[next_initial] < heap[0]):
            next_initial += 1
            state = initial[next_initial - 1][2]
        else:
            state = heapq.heappop(heap)[2]
        return _State(groups, [state]) if isinstance(state, int) else state

    while len(initial) - next_initial + len(heap) > 1:
        a = serve()
        b = serve()
        state = _merge(groups, a, b, k)
        heapq.heappush(heap, (-state.spread(groups, k, zero), next_id, state))
        next_id += 1
    last = heap[0][2] if heap else initial[-1][2]
    ids = [last] if isinstance(last, int) else [-g for _, g in last.light]
    ids.sort(key=lambda g: (-groups.sums[g], g))
    result = [groups.items(g) for g in ids] + [[] for _ in range(k - len(ids))]
    sums = [groups.sums[g] for g in ids] + [zero] * (k - len(ids))
    refine(weights, result, sums, allow_moves=not equal_size, max_rounds=n)
    return [sorted(g) for g in result]


def refine(weights, groups, sums, *, allow_moves: bool, max_rounds: int) -> None:
    """Move/swap items from the heaviest to the lightest group while that narrows their gap (in place).

    The heaviest and lightest groups (lowest index among equal sums) come from two heaps of (sum, index)
    entries; an entry whose sum is no longer the group's is stale and skipped.
    """
    heaviest = [(-s, g) for g, s in enumerate(sums)]
    lightest = [(s, g) for g, s in enumerate(sums)]
    heapq.heapify(heaviest)
    heapq.heapify(lightest)
    for _ in range(max_rounds):
        while -heaviest[0][0] != sums[heaviest[0][1]]:
            heapq.heappop(heaviest)
        while lightest[0][0] != sums[lightest[0][1]]:
            heapq.heappop(lightest)
        heavy, light = heaviest[0][1], lightest[0][1]
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
        for g in (heavy, light):
            heapq.heappush(heaviest, (-sums[g], g))
            heapq.heappush(lightest, (sums[g], g))


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
