"""plan_micro_batches: balanced ranks, token-capped micro-batches, the same count on every rank."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _backend, _plan
from ._checks import MAX_GROUPS, check_lengths, check_positive_int, workload_weights
from .partition import split_flat


@dataclass
class MicroBatchPlan:
    """``plan[rank][micro_batch]`` is a list of indices into the planned ``lengths``, sorted ascending.

    Every rank has ``num_micro_batches`` micro-batches, heaviest first; no micro-batch holds more than
    ``max_tokens`` tokens. ``token_counts[rank, micro_batch]`` gives the tokens of each micro-batch.
    """

    micro_batches: list
    max_tokens: int
    token_counts: np.ndarray = field(repr=False)

    @property
    def num_ranks(self) -> int:
        return len(self.micro_batches)

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches[0]) if self.micro_batches else 0

    def __getitem__(self, rank):
        return self.micro_batches[rank]

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __iter__(self):
        return iter(self.micro_batches)

    def __eq__(self, other) -> bool:
        if isinstance(other, MicroBatchPlan):
            return self.micro_batches == other.micro_batches and self.max_tokens == other.max_tokens
        return self.micro_batches == other


def plan_micro_batches(lengths, max_tokens, *, num_ranks=1, equal_size: bool = False, workload=None,
                       min_micro_batches=1, backend=None) -> MicroBatchPlan:
    """Plan data-parallel ranks and token-budgeted micro-batches for variable-length sequences.

    Ranks are balanced by Karmarkar-Karp on ``workload`` (tokens by default); each rank is packed into the
    fewest micro-batches of at most ``max_tokens`` tokens that a KK split or first-fit-decreasing finds; every
    rank is then brought to the same count M (the largest) by balanced re-splitting, never exceeding the cap;
    micro-batches run heaviest first so that the j-th steps of all ranks cost about the same (see ``_plan.py``).

    Args:
        lengths: 1-D integers >= 1, tokens per sequence (prompt + response as the model sees them).
        max_tokens: token budget of one micro-batch (>= 1; any size, a cap past the total tokens plans as no
            cap). A longer sequence raises ``ValueError``.
        num_ranks: data-parallel ranks (>= 1).
        equal_size: every rank gets ``len(lengths) / num_ranks`` sequences.
        workload: what ranks balance: ``None`` / ``"tokens"``, ``"attention"`` or ``(a, b)``; see
            ``balanced_partition``. Micro-batches always respect the token cap.
        min_micro_batches: at least this many micro-batches per rank (>= 1).
        backend: ``None`` (C++ when built), ``"cpp"`` or ``"python"``; both give identical plans.
    """
    lengths = check_lengths("lengths", lengths, minimum=1)
    max_tokens = check_positive_int("max_tokens", max_tokens)
    num_ranks = check_positive_int("num_ranks", num_ranks, MAX_GROUPS)
    min_micro_batches = check_positive_int("min_micro_batches", min_micro_batches, MAX_GROUPS)
    if lengths.size and int(lengths.max()) > max_tokens:
        where = int(np.argmax(lengths > max_tokens))
        raise ValueError(
            f"lengths: expected every sequence to fit max_tokens={max_tokens}, "
            f"got sequence {where} with {int(lengths[where])} tokens"
        )
    if equal_size and lengths.size % num_ranks:
        raise ValueError(
            f"lengths: equal_size=True expects a length divisible by num_ranks={num_ranks}, "
            f"got {lengths.size} sequences"
        )
    weights = workload_weights(lengths, workload)
    # A cap at or above the total token count plans exactly like the total itself (every rank fits in one
    # micro-batch at the lower bound, and every split fits), so both paths get min(max_tokens, total): any
    # Python int is accepted, and the C++ path never sees a cap past int64 (< 2**62 by check_lengths).
    cap = min(max_tokens, max(int(lengths.sum()), 1))
    native = _backend.choose(backend)
    if native is None:
        micro_batches = _plan.plan(lengths.tolist(), weights.tolist(), cap, num_ranks, bool(equal_size),
                                   min_micro_batches)
        count = len(micro_batches[0])
        sizes = [len(mb) for rank in micro_batches for mb in rank]
        order = np.fromiter((i for rank in micro_batches for mb in rank for i in mb), np.int64, sum(sizes))
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    else:
        order, offsets, count = native.batcher_plan(lengths, np.ascontiguousarray(weights), cap,
                                                    num_ranks, bool(equal_size), min_micro_batches)
        flat = split_flat(order, offsets)
        micro_batches = [flat[r * count : (r + 1) * count] for r in range(num_ranks)]
    return MicroBatchPlan(micro_batches, max_tokens, _token_counts(order, offsets, lengths, num_ranks, count))


def _token_counts(order: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, ranks: int, count: int):
    """Tokens of every micro-batch from the flat form (micro-batch j is order[offsets[j]:offsets[j+1]])."""
    cumulative = np.concatenate([[0], np.cumsum(lengths[order], dtype=np.int64)])
    return (cumulative[offsets[1:]] - cumulative[offsets[:-1]]).reshape(ranks, count)
