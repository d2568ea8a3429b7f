"""Fused linear log-probs / PPO loss benchmarks: ``python benchmarks/bench_linear.py [--quick] [--out DIR]``.

Full size needs a CUDA GPU (N=8192, H=4096, V=151936, bf16); ``--quick`` runs tiny shapes on CPU in seconds.
"""
import argparse

from rlhf_fast.bench import run_benchmarks

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, CPU friendly")
    parser.add_argument("--out", default="bench_out/linear", help="output folder for CSV, markdown and plots")
    args = parser.parse_args()
    run_benchmarks(out_dir=args.out, quick=args.quick, only=["linear"])
