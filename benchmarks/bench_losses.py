"""The losses benchmark family: ``python benchmarks/bench_losses.py [--quick] [--out DIR]``."""
import argparse

from rlhf_fast.bench import run_benchmarks

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes, a few repetitions (CPU CI)")
    parser.add_argument("--out", default="bench_out/losses", help="output directory (CSV, markdown, plots)")
    args = parser.parse_args()
    run_benchmarks(out_dir=args.out, quick=args.quick, only=["losses"])
