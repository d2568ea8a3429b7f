"""balanced_partition: split sequences into k groups of near-equal total workload."""
from __future__ import annotations

import numpy as np

from . import _backend, _kk
from ._checks import MAX_GROUPS, check_lengths, check_positive_int, workload_weights


def balanced_partition(lengths, k, *, equal_size: bool = False, workload=None, backend=None) -> list[list[int]]:
    """Indices of ``lengths`` split into ``k`` groups whose workloads are as equal as possible.

    Karmarkar-Karp largest differencing (k-way), followed by a move/swap refinement between the heaviest and
    lightest groups, so the result is never worse than plain Karmarkar-Karp (see ``_kk.py``).

    Args:
        lengths: 1-D integers >= 0 (list, NumPy array or torch tensor), e.g. sequence lengths in tokens.
        k: number of groups, in [1, 2**31 - 1]. Groups may be empty when there are fewer items than groups.
        equal_size: every group gets exactly ``len(lengths) / k`` items (``len(lengths) % k`` must be 0).
        workload: what to balance: ``None`` / ``"tokens"`` (the lengths), ``"attention"`` (``len**2``) or
            ``(a, b)`` for ``a * len + b * len**2``.
        backend: ``None`` (C++ when built), ``"cpp"`` or ``"python"``; both give identical groups.

    Returns:
        ``k`` lists of indices, each sorted ascending; every index appears exactly once. Ties are broken by
        index, so the result is deterministic.
    """
    lengths = check_lengths("lengths", lengths, minimum=0)
    k = check_positive_int("k", k, MAX_GROUPS)
    if equal_size and lengths.size % k:
        raise ValueError(
            f"lengths: equal_size=True expects a length divisible by k={k}, got {lengths.size} sequences"
        )
    weights = workload_weights(lengths, workload)
    native = _backend.choose(backend)
    if native is None:
        return _kk.kk_partition(weights.tolist(), k, bool(equal_size))
    order, offsets = native.batcher_partition(np.ascontiguousarray(weights), k, bool(equal_size))
    return split_flat(order, offsets)


def split_flat(order: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    """Lists of indices from the flat (order, offsets) form the C++ functions return."""
    flat = order.tolist()
    bounds = offsets.tolist()
    return [flat[bounds[j] : bounds[j + 1]] for j in range(len(bounds) - 1)]
