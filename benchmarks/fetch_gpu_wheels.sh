#!/usr/bin/env bash
# Download the peer baselines for the lent GPU machine (Python 3.12, no registry there) into .whl/ at the repo root.
# Run here, where pip reaches a registry:  bash benchmarks/fetch_gpu_wheels.sh
# Then the device call names `carry: [".whl"]` and gpu_check.sh installs them into /tmp/site (PYTHONPATH).
#
# Only what the GPU image lacks (its package list: .library/device/KINDS.md), all pure Python, --no-deps:
# - liger-kernel, trl: the peers the benchmarks compare against;
# - datasets, dill, multiprocess: the backward of trl.kernels.ChunkedLogProbFunction imports trl.trainer.utils,
#   which imports datasets (and datasets dill and multiprocess); everything else they import (pandas, pyarrow,
#   accelerate, xxhash, fsspec, huggingface_hub, ...) is in the image. Found by importing trl.trainer.utils with
#   only the image's packages on the path. datasets 5.0.x: it accepts pyarrow>=21 and huggingface_hub<2 (the
#   image has 1.33); its import was checked with pyarrow 19, 21 and 26.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PEERS=(liger-kernel==0.8.5 trl==1.16.0 datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${PEERS[@]}"

# Two versions of one package stop the whole install there: drop any older wheel of the same name first.
mkdir -p .whl
for wheel in "$tmp"/*.whl; do
  dist=$(basename "$wheel" | cut -d- -f1)
  rm -f .whl/"$dist"-*.whl
  mv "$wheel" .whl/
done
ls -l .whl
du -sh .whl
