"""The eager reference beside torch.compile of it: ``python benchmarks/bench_reference.py [--quick] [--out DIR]``."""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "reference", *sys.argv[1:]]))
