"""PPO policy + value losses forward and backward.

``python benchmarks/bench_losses.py [--quick] [--out DIR]`` (``--quick``: tiny shapes on CPU in seconds); the same as
``rlhf-fast bench --only losses``. Writes a CSV, a markdown table and PNG plots (default DIR: bench_out/losses).
"""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "losses", "--out", "bench_out/losses", *sys.argv[1:]]))
