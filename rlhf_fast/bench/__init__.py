"""Kernel microbenchmarks: one module per op family, each with ``run(bench)``; see ``harness.Bench``."""
from __future__ import annotations

import importlib
import importlib.util

from .harness import Bench

# Families in run order; a module not written yet is skipped.
# The GPU-heavy families come first so that a time-limited run keeps the numbers that matter most.
FAMILIES = ("logprobs", "linear", "dpo", "losses", "advantages", "reference", "batching", "packing", "rollout")


def available_families() -> list[str]:
    return [f for f in FAMILIES if importlib.util.find_spec(f"{__name__}.{f}") is not None]


def run_benchmarks(out_dir: str = "bench_out", quick: bool = False, only=None) -> dict:
    families = available_families()
    if only:
        unknown = sorted(set(only) - set(families))
        if unknown:
            raise ValueError(f"only: expected families among {families}, got {unknown}")
        families = [f for f in families if f in only]
    bench = Bench(quick=quick)
    for family in families:
        print(f"[{family}]", flush=True)
        importlib.import_module(f"{__name__}.{family}").run(bench)
        bench.write(out_dir, plots=False)  # keep what is measured so far if a later family is cut off
    paths = bench.write(out_dir)
    print(f"wrote {paths['csv']}, {paths['markdown']} and {len(paths['plots'])} plots")
    return paths
