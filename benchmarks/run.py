"""Run the kernel microbenchmarks: ``python benchmarks/run.py [--quick] [--only FAMILY ...] [--out DIR]``.

Same as ``rlhf-fast bench``. Writes a CSV, a markdown table and PNG plots to ``--out``.
"""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
