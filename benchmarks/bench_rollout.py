"""Rollout engines, hf generate against vllm: ``python benchmarks/bench_rollout.py [--quick] [--out DIR]``.

Run it in an environment with vllm (on CPU: ``.venv-vllm/bin/python``, built by scripts/setup_vllm_env.sh);
without vllm only the hf rows are measured. Writes ``DIR/<device>_rollout.csv`` and ``.md`` (with the machine and
its load described); DIR defaults to benchmarks/results. The same family runs as ``rlhf-fast bench --only rollout``.
"""
import argparse
import os
import platform

from rlhf_fast.bench import rollout
from rlhf_fast.bench.harness import Bench


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small CI preset")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    bench = Bench(quick=args.quick)
    load_before = os.getloadavg()[0]
    rollout.run(bench)
    load_after = os.getloadavg()[0]
    stem = f"{'gpu' if bench.on_cuda else 'cpu'}_rollout{'_quick' if args.quick else ''}"
    paths = bench.write(args.out, stem=stem, plots=False)
    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "not installed"
    import torch
    import transformers

    with open(paths["markdown"], "a") as handle:
        handle.write("\n## Tokens per second and the PPO step's split\n\n| op | provider | shape | new tokens/s | "
                     "generate s | score s | train s |\n|---|---|---|---|---|---|---|\n")
        table = {}
        for row in bench.rows:
            table.setdefault((row.op, row.provider, row.shape), {})[row.metric] = row.value
        for (op, provider, shape), metrics in table.items():
            cells = [metrics.get(k) for k in ("tokens_per_s", "generate_s", "score_s", "train_s")]
            handle.write(f"| {op} | {provider} | {shape} | "
                         + " | ".join("-" if c is None else f"{c:.4g}" for c in cells) + " |\n")
        handle.write(
            f"\nMachine: {cpu_model()}, {os.cpu_count()} logical cores visible; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, vllm {vllm_version}, Python {platform.python_version()}. "
            f"One run, other processes sharing the cores (1-minute load average {load_before:.1f} before, "
            f"{load_after:.1f} after). 'median ms' is over the repeats (3). generate: every row samples the "
            "preset's new tokens (no stop token); ppo_step: the median time split of the measured PPO steps "
            "(see rlhf_fast/bench/rollout.py), rows generate_s / score_s / train_s in the CSV.\n"
        )
    print(f"wrote {paths['csv']} and {paths['markdown']}")


if __name__ == "__main__":
    main()
