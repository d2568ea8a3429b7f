#!/usr/bin/env bash
# Fresh machine -> virtual environment -> the package -> the main job: the built-in three-stage RLHF demo
# (SFT, reward model, PPO) when the trainer is installed, the quick kernel benchmarks otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
if rlhf-fast demo --help >/dev/null 2>&1; then
  rlhf-fast demo --out demo_out "$@"
else
  rlhf-fast bench --quick --out bench_out
fi
