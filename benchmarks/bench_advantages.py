"""GAE (per-timestep loop, C++ sweep, Triton) and masked whitening.

``python benchmarks/bench_advantages.py [--quick] [--out DIR]`` (``--quick``: tiny shapes on CPU in seconds); the same as
``rlhf-fast bench --only advantages``. Writes a CSV, a markdown table and PNG plots (default DIR: bench_out/advantages).
"""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "advantages", "--out", "bench_out/advantages", *sys.argv[1:]]))
