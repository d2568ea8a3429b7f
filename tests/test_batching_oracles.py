"""Independent oracles for the batcher tests (no tests here): textbook Karmarkar-Karp (no refinement) and FFD."""
import heapq

import pytest

from rlhf_fast.batching._backend import native_batcher

BACKENDS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(
    native_batcher() is None, reason="rlhf_fast._C was built without the batcher"))]
needs_cpp = pytest.mark.skipif(native_batcher() is None, reason="rlhf_fast._C was built without the batcher")


def plain_kk_sums(weights, k, equal_size=False):
    """Group sums of plain k-way largest differencing (same tie rules as the library, no refinement)."""
    n = len(weights)
    heap = []
    if equal_size:
        order = sorted(range(n), key=lambda i: (weights[i], i))
        for c in range(n // k):
            sums = [weights[i] for i in reversed(order[c * k:(c + 1) * k])]
            heap.append((-(sums[0] - sums[-1]), c, sums))
        ident = n // k
    else:
        for i, w in enumerate(weights):
            sums = [w] + [0] * (k - 1)
            heap.append((-(sums[0] - sums[-1]), i, sums))
        ident = n
    heapq.heapify(heap)
    while len(heap) > 1:
        a = heapq.heappop(heap)[2]
        b = heapq.heappop(heap)[2]
        sums = sorted((a[i] + b[k - 1 - i] for i in range(k)), reverse=True)
        heapq.heappush(heap, (-(sums[0] - sums[-1]), ident, sums))
        ident += 1
    return heap[0][2] if heap else [0] * k


def ffd_count(lengths, cap):
    room = []
    for length in sorted(lengths, reverse=True):
        for b, r in enumerate(room):
            if r >= length:
                room[b] -= length
                break
        else:
            room.append(cap - length)
    return len(room)
