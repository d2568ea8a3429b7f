"""Log-probs / entropy / fused PPO loss from logits: ``python benchmarks/bench_logprobs.py [--quick] [--out DIR]``.

Full size needs a CUDA GPU (B=4, T=2048, V=151936, bf16); ``--quick`` runs tiny shapes on CPU in seconds.
"""
import argparse

from rlhf_fast.bench import run_benchmarks

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, CPU friendly")
    parser.add_argument("--out", default="bench_out/logprobs", help="output folder for CSV, markdown and plots")
    args = parser.parse_args()
    run_benchmarks(out_dir=args.out, quick=args.quick, only=["logprobs"])
