#!/usr/bin/env bash
# Fresh machine -> virtual environment -> package with its test extras -> the test suite (CPU: Triton kernels
# run under TRITON_INTERPRET=1; GPU-marked tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
python -m pytest -q "$@"
