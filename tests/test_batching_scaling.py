"""The planner's memory grows linearly in the number of sequences, on both paths.

Each plan runs in a fresh process whose private memory is capped (RLIMIT_DATA: heap and anonymous mappings) at
what it holds after a warm-up plus a generous bound, so a planner that is quadratic in memory fails at once
with MemoryError instead of running for minutes. The dense Karmarkar-Karp states of the old planner (one k-vector
per sequence, k = micro-batches) needed about 2.5 GB here; the plans below need tens of MB. Speed is measured
in benchmarks/ (``plan_micro_batches_scaling``), not here.
"""
import subprocess
import sys

import numpy as np
import pytest

from rlhf_fast.batching import balanced_partition, plan_micro_batches

from test_batching_oracles import needs_cpp

BOUND_MIB = 384

CODE = r"""
import resource, sys
import numpy as np
from rlhf_fast.batching import plan_micro_batches

n, backend, bound_mib = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lengths = np.random.default_rng(0).integers(1, 8193, size=n)
plan_micro_batches(lengths[:2000], 16384, num_ranks=8, backend=backend)  # imports and first allocations

def private_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))

limit = private_bytes() + bound_mib * 2**20
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
plan = plan_micro_batches(lengths, 16384, num_ranks=8, backend=backend)
assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(n))
assert int(plan.token_counts.max()) <= 16384
print(plan.num_micro_batches)
"""


def plan_in_capped_process(n, backend):
    done = subprocess.run([sys.executable, "-c", CODE, str(n), backend, str(BOUND_MIB)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{backend} plan of {n} sequences within {BOUND_MIB} MiB: {done.stderr[-2000:]}"
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("backend, n", [pytest.param("cpp", 200_000, marks=needs_cpp), ("python", 40_000)])
def test_plan_memory_is_linear_in_sequences(backend, n):
    # 8 ranks of n / 8 sequences of 1..8192 tokens, 16k tokens a micro-batch: about n / 32 micro-batches per
    # rank (the old planner's states held n / 8 of those k-vectors per rank).
    micro_batches = plan_in_capped_process(n, backend)
    assert micro_batches > n // 40


@needs_cpp
@pytest.mark.parametrize("workload, equal_size", [(None, False), ("attention", True), ((0.5, 1.25), False)])
def test_paths_agree_on_plans_with_hundreds_of_micro_batches(workload, equal_size):
    # The property tests cover small plans; here every rank has hundreds of micro-batches (KK with large k,
    # first-fit over many bins, many halvings), where the sparse states and the heaps do most of their work.
    lengths = np.random.default_rng(1).integers(1, 4097, size=6000)
    kwargs = dict(num_ranks=4, workload=workload, equal_size=equal_size, min_micro_batches=3)
    cpp = plan_micro_batches(lengths, 8192, backend="cpp", **kwargs)
    assert cpp.micro_batches == plan_micro_batches(lengths, 8192, backend="python", **kwargs).micro_batches
    assert cpp.num_micro_batches > 300 and int(cpp.token_counts.max()) <= 8192


@needs_cpp
def test_paths_agree_on_a_partition_into_many_groups_with_zeros():
    lengths = np.random.default_rng(2).integers(0, 50, size=3000)  # many ties and zero-length items
    assert balanced_partition(lengths, 700, backend="cpp") == balanced_partition(lengths, 700, backend="python")
