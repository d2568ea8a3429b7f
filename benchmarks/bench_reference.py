"""The eager reference beside torch.compile of it.

``python benchmarks/bench_reference.py [--quick] [--out DIR]`` (``--quick``: tiny shapes on CPU in seconds); the same as
``rlhf-fast bench --only reference``. Writes a CSV, a markdown table and PNG plots (default DIR: bench_out/reference).
"""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "reference", "--out", "bench_out/reference", *sys.argv[1:]]))
