#!/usr/bin/env bash
# One script for a lent GPU machine: build, run the GPU tests, run every benchmark family at full size.
# Usage (from the repo root):  OUT=/some/dir bash benchmarks/gpu_check.sh
# Writes under $OUT: build.log, gpu_tests.log, nvidia-smi.txt and bench/ (CSV, markdown table, PNG plots).
# Budget: under 5 minutes on an H100 / H200.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/bench"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -20 "$OUT/build.log"; exit 1; }
timeout 150 python -m pytest -q -m gpu -x tests > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -5 "$OUT/gpu_tests.log"
timeout 240 python benchmarks/run.py --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
