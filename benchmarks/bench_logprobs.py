"""Log-probs / entropy / fused PPO loss from logits (full size needs a CUDA GPU: B=4, T=2048, V=151936).

``python benchmarks/bench_logprobs.py [--quick] [--out DIR]`` (``--quick``: tiny shapes on CPU in seconds); the same as
``rlhf-fast bench --only logprobs``. Writes a CSV, a markdown table and PNG plots (default DIR: bench_out/logprobs).
"""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "logprobs", "--out", "bench_out/logprobs", *sys.argv[1:]]))
