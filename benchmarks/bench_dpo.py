"""One DPO step from hidden states (linear_logprobs + dpo_loss) against the eager logits path (and Liger's fused
linear DPO loss when installed, on CUDA).

``python benchmarks/bench_dpo.py [--quick] [--out DIR]`` (``--quick``: tiny shapes on CPU in seconds); the same as
``rlhf-fast bench --only dpo``. Writes a CSV, a markdown table and PNG plots (default DIR: bench_out/dpo).
"""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "dpo", "--out", "bench_out/dpo", *sys.argv[1:]]))
