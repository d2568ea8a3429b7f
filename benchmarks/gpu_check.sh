#!/usr/bin/env bash
# One run on a lent GPU machine: build, the GPU tests, every benchmark family at full size, packed so that all of
# it comes back (the device tool returns at most 8 files from $OUT, no deeper than 2 folders).
#
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Through the device tool: first run `bash benchmarks/fetch_gpu_wheels.sh` here (the peer baselines Liger-Kernel and
# TRL as wheels in .whl/, which git ignores; that machine has no registry), then call `run` with
#   carry: [".whl"]   command: OUT=$OUT bash benchmarks/gpu_check.sh   timeout_s: 420
# or, to also time the launch-config candidates of benchmarks/tune_gpu.py (about 3 more minutes):
#   carry: [".whl"]   command: GPU_CHECK_TUNE=1 OUT=$OUT bash benchmarks/gpu_check.sh   timeout_s: 600
# (GPU_CHECK_PPO=1 adds an end-to-end PPO update / step, kernels vs torch, up to 150 s more.)
# Without .whl/ the peers are missing from the tables (each family says so), nothing else changes.
#
# Leaves in $OUT three files: summary.md (versions, the GPU, the GPU test result, every family's table, the peers
# skipped and why, each step's exit code and seconds), gpu_tests.log, and results.tar.gz (everything: each family's
# CSV, markdown and PNG plots, every step's log). The steps write into $WORK. Each step is its own process under its
# own time limit, all of them inside one budget, so a slow step (a long compile, say) cannot cost the others their
# numbers, and a failed step never stops the run. Exit code 0 when every step passed, else 1 (143 after a TERM).
# Switches: GPU_CHECK_BUDGET_S (default 300, plus 180 with GPU_CHECK_TUNE=1: seconds for the whole run),
# GPU_CHECK_TUNE=1 (run benchmarks/tune_gpu.py last, its table in summary.md), GPU_CHECK_PPO=1 (one PPO update
# and step end to end, kernels vs RLHF_FAST_BACKEND=torch: benchmarks/bench_ppo_step.py; +150 s), GPU_CHECK_QUICK=1 (benchmarks in --quick
# mode: a bookkeeping check on a CPU machine), GPU_CHECK_BUILD=0 (no pip install -e: the source tree is imported),
# GPU_CHECK_WHEELS (default .whl), GPU_CHECK_WORK (default: a new temp dir).
set -uo pipefail
OUT=${OUT:-gpu_out}
TUNE=${GPU_CHECK_TUNE:-0}
PPO=${GPU_CHECK_PPO:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-$((300 + (TUNE == 1 ? 180 : 0) + (PPO == 1 ? 150 : 0)))}
RESERVE=10  # seconds kept for the summary and the tarball
WHEELS=${GPU_CHECK_WHEELS:-.whl}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
PY=python3  # the GPU image's python3 is the one with torch ('python' may not exist there)
mkdir -p "$OUT" "$WORK/logs"
STEPS="$WORK/steps.md"
printf '| step | exit code | seconds | limit s |\n|---|---|---|---|\n' > "$STEPS"
# The source tree first, so this checkout is what runs even if the build step fails.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT CMD...: CMD under `timeout` (capped by what is left of the budget), logged and timed
  local name=$1 limit=$2 left t0 rc status
  shift 2
  left=$((BUDGET - RESERVE - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "| $name | not run (budget spent) | 0 | 0 |" >> "$STEPS"
    echo "[$name] not run: budget spent"
    FAILED=1
    return 1
  fi
  t0=$SECONDS
  # In the background with `wait`, so that a TERM to this script is handled at once, not when the step ends.
  # STEP_SIGNAL=INT for pytest: on SIGINT it still prints the failures so far (on TERM it prints nothing).
  timeout -s "${STEP_SIGNAL:-TERM}" -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 &
  CHILD=$! CURRENT=$name
  wait "$CHILD"
  rc=$?
  CHILD=
  ((rc)) && FAILED=1
  status=$rc
  ((rc == 124 || rc == 137)) && status="$rc (timed out)"
  echo "| $name | $status | $((SECONDS - t0)) | $limit |" >> "$STEPS"
  echo "[$name] rc=$status in $((SECONDS - t0)) s"
  return "$rc"
}

finish() {  # summary.md, gpu_tests.log and results.tar.gz in $OUT; runs on exit, also after a TERM
  trap - EXIT TERM INT
  local s="$WORK/summary.md" family log name notes
  {
    echo "# gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    cat "$WORK/versions.txt" 2>/dev/null
    cat "$WORK/nvidia-smi.txt" 2>/dev/null
    echo '```'
    echo
    echo "## Steps (budget ${BUDGET} s, total $SECONDS s)"
    echo
    cat "$STEPS"
    echo
    echo "## GPU tests (tail)"
    echo
    echo '```'
    tail -15 "$WORK/logs/gpu_tests.log" 2>/dev/null
    echo '```'
    if [[ -f $WORK/ppo_step.csv ]]; then
      printf '\n## PPO step end to end (bench_ppo_step.py)\n\n```\n%s\n```\n' "$(cat "$WORK/ppo_step.csv")"
    fi
    if [[ -f $WORK/tune_gpu/tune_gpu.md ]]; then
      echo
      echo "## tune_gpu"
      sed -e '1d' -e 's/^## /### /' "$WORK/tune_gpu/tune_gpu.md"
    fi
    for log in "$WORK"/logs/*.log; do  # the end of every step that failed (benchmark families below)
      name=$(basename "$log" .log)
      [[ $name == bench_* || $name == gpu_tests ]] && continue
      grep -q "^| $name | 0 |" "$STEPS" && continue
      printf '\n## %s failed (log tail)\n\n```\n%s\n```\n' "$name" "$(tail -20 "$log")"
    done
    for family in "${FAMILIES[@]}"; do
      family=${family%%:*}
      log="$WORK/logs/bench_$family.log"
      [[ -f $log ]] || continue
      echo
      echo "## bench $family"
      echo
      notes=$(grep -E "^  skipped|failed:" "$log" | head -20)  # peers skipped (and why), failed providers
      [[ -n $notes ]] && printf '```\n%s\n```\n\n' "$notes"
      if [[ -f $WORK/bench_$family/results.md ]]; then
        sed -e '1d' -e 's/^## /### /' "$WORK/bench_$family/results.md"  # its title line goes; headings one down
      else  # cut off before it wrote its table: the measurement lines it printed, then the end of its log
        echo "no table written; measurements printed and log tail:"
        echo '```'
        grep -E "^  .* ms" "$log"
        tail -8 "$log"
        echo '```'
      fi
    done
  } > "$s"
  cp "$s" "$OUT/summary.md"
  cp "$WORK/logs/gpu_tests.log" "$OUT/gpu_tests.log" 2>/dev/null
  tar -czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null || echo "tar failed"
  ls -l "$OUT"
  cat "$STEPS"
  exit "$FAILED"
}
FAILED=0
FAMILIES=(logprobs:60 linear:75 losses:30 advantages:25 reference:25)
trap finish EXIT
on_term() {  # a TERM from an outer limit: stop the running step, note it, and still write the summary
  if [[ -n $CHILD ]]; then
    kill "$CHILD" 2>/dev/null
    echo "| $CURRENT | interrupted (TERM) | | |" >> "$STEPS"
  fi
  FAILED=143
  exit 143
}
CHILD= CURRENT=
trap on_term TERM INT

# ---- versions and the GPU --------------------------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$WORK/nvidia-smi.txt" 2>&1 ||
  echo "nvidia-smi failed" >> "$WORK/nvidia-smi.txt"

# ---- peer baselines carried as wheels (carry: [".whl"]) ----------------------------------------------------------
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" && export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
  echo "| wheels | none in $WHEELS (carry: [\".whl\"]) | 0 | 0 |" >> "$STEPS"
fi
"$PY" - > "$WORK/versions.txt" 2>&1 <<'EOF'
import importlib, importlib.metadata, platform
print("python", platform.python_version())
for module, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                     ("liger_kernel", "liger-kernel"), ("trl", "trl"), ("datasets", "datasets")):
    try:
        importlib.import_module(module)
        print(module, importlib.metadata.version(dist))
    except Exception as exc:  # noqa: BLE001 - a version line, not a failure
        print(module, "not importable:", type(exc).__name__, (str(exc).splitlines() or [""])[0][:80])
import torch
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
cat "$WORK/versions.txt"

# ---- build, GPU tests, benchmarks --------------------------------------------------------------------------------
if [[ ${GPU_CHECK_BUILD:-1} != 0 ]]; then
  step build 120 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
# Only the kernel test files (a collection error in a trainer module must not cost the kernel tests), the
# slowest to compile (linear) last, so a time-out still leaves the others' results.
STEP_SIGNAL=INT
step gpu_tests 150 "$PY" -m pytest -q -rfE --durations=15 -p no:cacheprovider -m gpu \
  tests/test_kernels_advantages.py tests/test_kernels_losses.py tests/test_kernels_logprobs.py \
  tests/test_kernels_fused_loss.py tests/test_kernels_linear.py
STEP_SIGNAL=TERM
tail -3 "$WORK/logs/gpu_tests.log"
quick=()
[[ ${GPU_CHECK_QUICK:-0} == 1 ]] && quick=(--quick)
for family_limit in "${FAMILIES[@]}"; do
  family=${family_limit%%:*}
  step "bench_$family" "${family_limit##*:}" "$PY" benchmarks/run.py "${quick[@]}" --only "$family" \
    --out "$WORK/bench_$family"
done
if [[ $PPO == 1 ]]; then
  preset=gpu
  [[ ${GPU_CHECK_QUICK:-0} == 1 ]] && preset=cpu
  step ppo_step 150 "$PY" benchmarks/bench_ppo_step.py --preset "$preset" --out "$WORK/ppo_step.csv"
fi
if [[ $TUNE == 1 ]]; then  # last: the issues' benchmarks above come first
  step tune_gpu 180 "$PY" benchmarks/tune_gpu.py "${quick[@]}" --budget-s 150 --out "$WORK/tune_gpu"
fi
