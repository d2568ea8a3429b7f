"""Property tests of balanced_partition and plan_micro_batches on both paths (C++ and the Python fallback)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast.batching import balanced_partition, plan_micro_batches

from test_batching_oracles import BACKENDS, ffd_count, needs_cpp, plain_kk_sums

FAST = settings(max_examples=60, deadline=None)
THOROUGH = settings(max_examples=250, deadline=None)  # C++ == Python is cheap to check and the key claim
WORKLOADS = st.sampled_from([None, "tokens", "attention", (3, 1), (0.5, 1.25)])


@st.composite
def partition_case(draw, min_length=0):
    k = draw(st.integers(1, 9))
    scale = draw(st.sampled_from([3, 100, 5000]))
    lengths = draw(st.lists(st.integers(min_length, scale), max_size=70))
    return lengths, k


def weights_of(lengths, workload):
    if workload in (None, "tokens"):
        return list(lengths)
    a, b = (0, 1) if workload == "attention" else workload
    if isinstance(a, float) or isinstance(b, float):
        return [float(a) * float(x) + float(b) * float(x) * float(x) for x in lengths]
    return [a * x + b * x * x for x in lengths]


# ------------------------------------------------------------------------------------------ partition


@FAST
@given(partition_case(), st.booleans(), WORKLOADS)
def test_partition_covers_every_index_once(case, equal_size, workload):
    lengths, k = case
    if equal_size:
        lengths = lengths[: len(lengths) - len(lengths) % k]
    groups = balanced_partition(lengths, k, equal_size=equal_size, workload=workload, backend="python")
    assert len(groups) == k
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in groups)
    if equal_size:
        assert {len(g) for g in groups} <= {len(lengths) // k}


@needs_cpp
@THOROUGH
@given(partition_case(), st.booleans(), WORKLOADS)
def test_partition_cpp_equals_python(case, equal_size, workload):
    lengths, k = case
    if equal_size:
        lengths = lengths[: len(lengths) - len(lengths) % k]
    kwargs = dict(equal_size=equal_size, workload=workload)
    assert balanced_partition(lengths, k, backend="cpp", **kwargs) == balanced_partition(
        lengths, k, backend="python", **kwargs)


@FAST
@given(partition_case(), st.booleans(), WORKLOADS)
def test_partition_at_least_as_balanced_as_karmarkar_karp(case, equal_size, workload):
    lengths, k = case
    if equal_size:
        lengths = lengths[: len(lengths) - len(lengths) % k]
    weights = weights_of(lengths, workload)
    groups = balanced_partition(lengths, k, equal_size=equal_size, workload=workload)
    sums = [sum(weights[i] for i in g) for g in groups]
    reference = plain_kk_sums(weights, k, equal_size)
    slack = 1e-9 * max(1.0, float(sum(weights)))  # float workloads add in different orders
    assert max(sums) <= max(reference) + slack
    assert min(sums) >= min(reference) - slack


def test_partition_beats_plain_karmarkar_karp_on_the_textbook_case():
    # Plain 2-way KK splits [4, 5, 6, 7, 8] as 16 / 14; the refinement finds the perfect 15 / 15.
    assert sorted(plain_kk_sums([4, 5, 6, 7, 8], 2)) == [14, 16]
    groups = balanced_partition([4, 5, 6, 7, 8], 2)
    assert sorted(sum([4, 5, 6, 7, 8][i] for i in g) for g in groups) == [15, 15]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partition_inputs_and_edge_cases(backend):
    lengths = [5, 1, 9, 3, 3, 7]
    expected = balanced_partition(lengths, 3, backend=backend)
    assert balanced_partition(np.array(lengths, dtype=np.int32), 3, backend=backend) == expected
    assert balanced_partition(torch.tensor(lengths), np.int64(3), backend=backend) == expected
    assert balanced_partition([], 4, backend=backend) == [[], [], [], []]
    assert balanced_partition([], 2, equal_size=True, backend=backend) == [[], []]
    assert balanced_partition([7, 0, 0], 1, backend=backend) == [[0, 1, 2]]
    assert sorted(map(len, balanced_partition([4, 4], 5, backend=backend))) == [0, 0, 0, 1, 1]
    assert balanced_partition([3, 3, 3, 3], 2, backend=backend) == balanced_partition([3, 3, 3, 3], 2, backend=backend)


def test_attention_workload_balances_squares():
    # By tokens both halves hold 1040 tokens, but the 1000-token sequence then also carries 4 short ones.
    lengths = [1000, 990] + [10] * 9
    square = [x * x for x in lengths]
    by_tokens = balanced_partition(lengths, 2)
    by_attention = balanced_partition(lengths, 2, workload="attention")
    assert sorted(sum(lengths[i] for i in g) for g in by_tokens) == [1040, 1040]
    worst = lambda groups: max(sum(square[i] for i in g) for g in groups)  # noqa: E731
    assert worst(by_attention) == 1000 ** 2 < worst(by_tokens)


# ----------------------------------------------------------------------------------------------- plan


@st.composite
def plan_case(draw):
    cap = draw(st.integers(1, 400))
    lengths = draw(st.lists(st.integers(1, cap), max_size=80))
    ranks = draw(st.integers(1, 6))
    return lengths, cap, ranks


def check_plan(plan, lengths, cap, ranks):
    assert len(plan) == ranks
    counts = {len(rank) for rank in plan}
    assert len(counts) == 1  # the same number of micro-batches on every rank
    seen = [i for rank in plan for mb in rank for i in mb]
    assert sorted(seen) == list(range(len(lengths)))  # every sequence exactly once
    for r, rank in enumerate(plan):
        tokens = [sum(lengths[i] for i in mb) for mb in rank]
        assert all(t <= cap for t in tokens)  # the cap holds strictly
        assert tokens == sorted(tokens, reverse=True)  # heaviest first
        assert plan.token_counts[r].tolist() == tokens
        assert all(mb == sorted(mb) for mb in rank)
        in_rank = sum(len(mb) for mb in rank)
        empties = sum(1 for mb in rank if not mb)
        assert empties == max(0, len(rank) - in_rank)  # empty only when the rank is short of sequences


@FAST
@given(plan_case(), st.booleans())
def test_plan_properties(case, equal_size):
    lengths, cap, ranks = case
    if equal_size:
        lengths = lengths[: len(lengths) - len(lengths) % ranks]
    plan = plan_micro_batches(lengths, cap, num_ranks=ranks, equal_size=equal_size, backend="python")
    check_plan(plan, lengths, cap, ranks)
    rank_sets = [sorted(i for mb in rank for i in mb) for rank in plan]
    if equal_size:
        assert {len(s) for s in rank_sets} <= {len(lengths) // ranks}
    # Ranks are exactly the balanced partition; micro-batch count no worse than FFD on the fullest rank.
    assert sorted(rank_sets) == sorted(balanced_partition(lengths, ranks, equal_size=equal_size))
    worst = max(ffd_count([lengths[i] for i in s], cap) for s in rank_sets)
    bound = max(-(-sum(lengths[i] for i in s) // cap) for s in rank_sets)
    assert bound <= plan.num_micro_batches <= max(worst, 1)


@needs_cpp
@THOROUGH
@given(plan_case(), st.booleans(), st.integers(1, 4), WORKLOADS)
def test_plan_cpp_equals_python(case, equal_size, min_mb, workload):
    lengths, cap, ranks = case
    if equal_size:
        lengths = lengths[: len(lengths) - len(lengths) % ranks]
    kwargs = dict(num_ranks=ranks, equal_size=equal_size, min_micro_batches=min_mb, workload=workload)
    cpp = plan_micro_batches(lengths, cap, backend="cpp", **kwargs)
    python = plan_micro_batches(lengths, cap, backend="python", **kwargs)
    assert cpp.micro_batches == python.micro_batches
    assert np.array_equal(cpp.token_counts, python.token_counts)
    check_plan(cpp, lengths, cap, ranks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_min_micro_batches_and_splitting(backend):
    lengths = [100, 90, 80, 70, 10, 5]
    plan = plan_micro_batches(lengths, 400, num_ranks=1, min_micro_batches=4, backend=backend)
    assert plan.num_micro_batches == 4 and all(plan[0])  # split, no empty micro-batch
    check_plan(plan, lengths, 400, 1)
    short = plan_micro_batches([5, 5, 5], 10, num_ranks=2, min_micro_batches=3, backend=backend)
    check_plan(short, [5, 5, 5], 10, 2)
    assert short.num_micro_batches == 3
    assert plan_micro_batches([], 8, num_ranks=3, backend=backend).micro_batches == [[[]], [[]], [[]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_gives_every_rank_the_same_count(backend):
    # Balanced ranks {60, 60, 60} and {90, 45, 45} (180 tokens each) need 3 and 2 micro-batches of 100 tokens;
    # the second rank is split to 3 as well, without an empty micro-batch.
    lengths = [60, 90, 60, 45, 60, 45]
    plan = plan_micro_batches(lengths, 100, num_ranks=2, backend=backend)
    check_plan(plan, lengths, 100, 2)
    assert sorted(sorted(i for mb in rank for i in mb) for rank in plan) == [[0, 2, 4], [1, 3, 5]]
    assert plan.num_micro_batches == 3 and all(mb for rank in plan for mb in rank)
