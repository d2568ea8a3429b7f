"""The ``rlhf-fast`` command."""
from __future__ import annotations

import argparse
import sys

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Fast, memory-lean RLHF toolkit.")
    parser.add_argument("--version", action="version", version=f"rlhf-fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="run the kernel microbenchmarks (CSV, markdown table, plots)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes that run on CPU in seconds")
    bench.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    bench.add_argument("--only", nargs="*", default=None, help="run only these benchmark families")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import run_benchmarks

        run_benchmarks(out_dir=args.out, quick=args.quick, only=args.only)
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
