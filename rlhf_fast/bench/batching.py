"""Rollout batcher: the C++ path (rlhf_fast._C) against the pure-Python fallback, on the same inputs (CPU).

Cases (full size; ``quick`` shrinks them):
- ``balanced_partition``: 16,384 lengths uniform in [1, 8192] into 128 groups (Karmarkar-Karp + refinement).
- ``plan_micro_batches``: 4,096 rollouts of 1..8,192 tokens onto 8 ranks, at most 32,768 tokens a micro-batch.
- ``pack_micro_batches`` / ``pad_micro_batches``: every micro-batch of that plan packed (input_ids,
  position_ids, cu_seqlens, one float32 per-token field) or right-padded with an attention mask.
- ``plan_and_pack``: the plan followed by packing every micro-batch, as a trainer step does.
- ``plan_micro_batches_scaling``: 1e4, 1e5 and 1e6 rollouts of 1..8,192 tokens onto 8 ranks, at most 16,384
  tokens a micro-batch (about n / 32 micro-batches per rank), each size in a fresh process that also reports
  its peak memory above what it held before planning; ``quick`` runs 1e4 and 1e5, the Python path 1e4 only
  (and 1e5 in full mode: at 1e6 it takes minutes).
The Python fallback is the baseline; the speedup column is python_ms / cpp_ms.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from ..batching import balanced_partition, pack, pad, plan_micro_batches
from ..batching._backend import native_batcher


def run(bench) -> None:
    if native_batcher() is None:
        print("  rlhf_fast._C was built without the batcher: nothing to compare")
        return
    rng = np.random.default_rng(0)
    items, groups = (2048, 16) if bench.quick else (16384, 128)
    lengths = rng.integers(1, 8193, size=items)
    shape = f"n={items} k={groups}"
    for backend in ("python", "cpp"):
        bench.measure("balanced_partition", backend, shape, "int64",
                      lambda b=backend: balanced_partition(lengths, groups, backend=b), baseline=backend == "python")

    rollouts, ranks, cap = (512, 4, 16384) if bench.quick else (4096, 8, 32768)
    lengths = rng.integers(1, 8193, size=rollouts)
    ids = [rng.integers(0, 150_000, size=n) for n in lengths]
    logprobs = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    tokens = int(lengths.sum())
    shape = f"n={rollouts} ranks={ranks} cap={cap}"
    plan = plan_micro_batches(lengths, cap, num_ranks=ranks)
    # Bytes written by a pack: int64 ids + int64 positions + float32 field (+ what is read: ids and field).
    pack_bytes = tokens * (8 + 8 + 4) + tokens * (8 + 4)

    def pack_all(plan, backend):
        for rank in plan:
            for mb in rank:
                pack(ids, indices=mb, fields={"old_logprobs": logprobs}, backend=backend)

    def pad_all(plan, backend):
        for rank in plan:
            for mb in rank:
                pad(ids, indices=mb, fields={"old_logprobs": logprobs}, backend=backend)

    def plan_and_pack(backend):
        pack_all(plan_micro_batches(lengths, cap, num_ranks=ranks, backend=backend), backend)

    for backend in ("python", "cpp"):
        base = backend == "python"
        bench.measure("plan_micro_batches", backend, shape, "int64",
                      lambda b=backend: plan_micro_batches(lengths, cap, num_ranks=ranks, backend=b), baseline=base)
        bench.measure("pack_micro_batches", backend, shape, "int64+fp32", lambda b=backend: pack_all(plan, b),
                      bytes_moved=pack_bytes, baseline=base)
        bench.measure("pad_micro_batches", backend, shape, "int64+fp32", lambda b=backend: pad_all(plan, b),
                      baseline=base)
        bench.measure("plan_and_pack", backend, shape, "int64+fp32", lambda b=backend: plan_and_pack(b),
                      baseline=base)

    scaling(bench)


# One plan size in a fresh process: wall ms of each repeat, CPU ms, and the peak resident memory above what the
# process held just before (Linux: the high-water mark is reset first; elsewhere ru_maxrss, which may hide it).
_SCALING_CODE = r"""
import json, resource, sys, time
import numpy as np
from rlhf_fast.batching import plan_micro_batches

n, backend, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lengths = np.random.default_rng(0).integers(1, 8193, size=n)
plan_micro_batches(lengths[:1000], 16384, num_ranks=8, backend=backend)

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(field + ":"))

try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status("VmRSS")
except OSError:
    before = None
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
times, cpu_start = [], cpu()
for _ in range(reps):
    start = time.perf_counter()
    plan_micro_batches(lengths, 16384, num_ranks=8, backend=backend)
    times.append((time.perf_counter() - start) * 1e3)
peak = status("VmHWM") - before if before is not None else None
print(json.dumps({"times_ms": times, "cpu_ms": (cpu() - cpu_start) * 1e3 / reps, "peak_extra_mib": peak}))
"""


def scaling(bench) -> None:
    # (sequences, backend, repeats). The Python fallback at 1e6 takes minutes: run it by hand, e.g.
    # python -c "from rlhf_fast.bench.batching import _SCALING_CODE as c; exec(c)" 1000000 python 1
    runs = [(10_000, "python", 3), (10_000, "cpp", 5), (100_000, "cpp", 5)]
    if not bench.quick:
        runs += [(100_000, "python", 1), (1_000_000, "cpp", 3)]
    for n, backend, reps in sorted(runs, key=lambda run: (run[0], run[1] != "python")):
        shape = f"n={n} ranks=8 cap=16384"
        done = subprocess.run([sys.executable, "-c", _SCALING_CODE, str(n), backend, str(reps)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  plan_micro_batches_scaling {backend} {shape} failed: {done.stderr.strip()[-300:]}")
            continue
        result = json.loads(done.stdout.splitlines()[-1])
        bench.record("plan_micro_batches_scaling", backend, shape, "int64", result["times_ms"],
                     peak_mib=result["peak_extra_mib"], baseline=backend == "python",
                     extra_metrics={"cpu_ms": result["cpu_ms"]})
