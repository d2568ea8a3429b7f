"""Padding-free training, packed against padded micro-batches: ``python benchmarks/bench_packing.py [--quick] [--out DIR]``.

Writes ``DIR/packing_<device>.csv``, ``DIR/packing_<device>.md`` (with a tokens/s table and the machine) and one
PNG per op; DIR defaults to benchmarks/results. The same family runs in ``rlhf-fast bench --only packing``.
"""
import argparse
import os
import platform

import torch

from rlhf_fast.bench import packing
from rlhf_fast.bench.harness import Bench


def tokens_table(bench) -> str:
    rows = {}
    for r in bench.rows:
        rows.setdefault((r.op, r.shape), {}).setdefault(r.provider, {})[r.metric] = r.value
    lines = ["\n## tokens / s (real tokens; higher is better)\n",
             "| op | case | padded tok/s | packed tok/s | packed / padded | max diff (packed - padded) |",
             "|---|---|---|---|---|---|"]
    for (op, shape), providers in rows.items():
        padded = providers.get("padded", {}).get("tokens_per_s")
        packed = providers.get("packed", {})
        diff = packed.get("max_abs_diff")
        rel = packed.get("max_rel_grad_diff")
        note = f"{diff:.1e}" + (f" (grad rel {rel:.1e})" if rel is not None else "") if diff is not None else "-"
        ratio = f"{packed['tokens_per_s'] / padded:.2f}x" if padded and packed.get("tokens_per_s") else "-"
        lines.append(f"| {op} | {shape} | {padded or 0:.0f} | {packed.get('tokens_per_s', 0):.0f} | {ratio} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    bench = Bench(quick=args.quick)
    load_before = os.getloadavg()[0]
    packing.run(bench)
    load_after = os.getloadavg()[0]
    stem = f"packing_{'cuda' if bench.on_cuda else 'cpu'}" + ("_quick" if args.quick else "")
    paths = bench.write(args.out, stem=stem)
    with open(paths["markdown"], "a") as handle:
        handle.write(tokens_table(bench))
        machine = torch.cuda.get_device_name() if bench.on_cuda else f"{platform.processor() or platform.machine()}"
        handle.write(
            f"\nMachine: {machine}, {os.cpu_count()} logical cores visible; Python {platform.python_version()}, "
            f"torch {torch.__version__}. One run; on CPU one torch thread with other processes sharing the cores "
            f"(1-minute load average {load_before:.1f} before, {load_after:.1f} after). 'median ms' is the whole "
            "batch (every micro-batch of the plan); 'pad' in the case is padded positions / real tokens.\n")
    print(f"wrote {paths['csv']} and {paths['markdown']}")


if __name__ == "__main__":
    main()
