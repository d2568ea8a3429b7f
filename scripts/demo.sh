#!/usr/bin/env bash
# Fresh machine -> virtual environment -> the package -> the main job: the built-in three-stage RLHF demo
# (SFT on demonstrations, a reward model on a simulated annotator's preference pairs, PPO against it).
# Extra arguments go to `rlhf-fast demo` (for example --quick, --seed 1). Results land in demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
rlhf-fast demo --out demo_out "$@"
