#!/usr/bin/env bash
# One script for a lent GPU machine: build, run the GPU tests, run every benchmark family at full size.
# Usage (from the repo root):  OUT=/some/dir bash benchmarks/gpu_check.sh
# Writes under $OUT: versions.txt, nvidia-smi.txt, build.log, gpu_tests.log and bench_<family>/ (CSV, markdown
# table, PNG plots). Each family runs in its own process with its own time limit, so one slow family (for example
# a long torch.compile) cannot cost the others their numbers. Budget: under 5 minutes on an H100 / H200.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -20 "$OUT/build.log"; exit 1; }
timeout 100 python -m pytest -q -m gpu tests > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -5 "$OUT/gpu_tests.log"
for family_limit in logprobs:60 linear:45 losses:30 advantages:30 reference:30; do
  family=${family_limit%%:*}; limit=${family_limit##*:}
  timeout "$limit" python benchmarks/run.py --only "$family" --out "$OUT/bench_$family" > "$OUT/bench_$family.log" 2>&1
  echo "[$family] rc=$?"; grep -v "^\[" "$OUT/bench_$family.log" | tail -12
done
