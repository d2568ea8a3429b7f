"""Fused linear log-probs / PPO loss from hidden states (full size needs a CUDA GPU: N=8192, H=4096, V=151936).

``python benchmarks/bench_linear.py [--quick] [--out DIR]`` (``--quick``: tiny shapes on CPU in seconds); the same as
``rlhf-fast bench --only linear``. Writes a CSV, a markdown table and PNG plots (default DIR: bench_out/linear).
"""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "linear", "--out", "bench_out/linear", *sys.argv[1:]]))
