"""Rollout batcher, C++ against the Python fallback on CPU: ``python benchmarks/bench_batching.py [--quick] [--out DIR]``.

Writes ``DIR/cpu_batching.csv``, ``DIR/cpu_batching.md`` (with the machine described) and one PNG per op;
DIR defaults to benchmarks/results.
"""
import argparse
import os
import platform

from rlhf_fast.bench import batching
from rlhf_fast.bench.harness import Bench


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    bench = Bench(quick=args.quick)
    load_before = os.getloadavg()[0]
    batching.run(bench)
    load_after = os.getloadavg()[0]
    stem = "cpu_batching_quick" if args.quick else "cpu_batching"
    paths = bench.write(args.out, stem=stem)
    with open(paths["markdown"], "a") as handle:
        handle.write(
            f"\nMachine: {cpu_model()}, {os.cpu_count()} logical cores visible, no GPU; "
            f"Python {platform.python_version()}. One run, single-threaded, other processes sharing the cores "
            f"(1-minute load average {load_before:.1f} before, {load_after:.1f} after). "
            "'median ms' and 'IQR ms' are over the repeats of the harness (10 full, 3 quick). The Python "
            "fallback is the baseline, so the speedup is python_ms / cpp_ms.\n"
        )
    print(f"wrote {paths['csv']} and {paths['markdown']}")


if __name__ == "__main__":
    main()
