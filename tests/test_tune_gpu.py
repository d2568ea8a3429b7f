"""benchmarks/tune_gpu.py stays runnable: its --quick mode under the Triton interpreter, and its output check."""
import csv
import importlib.util
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "tune_gpu.py")


def _load():
    if "tune_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tune_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["tune_gpu"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["tune_gpu"]


def test_quick_mode_times_every_kernel(tmp_path):
    """Two candidates per kernel, tiny shapes, on CPU: every kernel gets a baseline and two checked, timed rows."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--device", "cpu", "--budget-s", "120", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "tune_gpu.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    tune = _load()
    for kernel in tune.KERNELS:
        mine = [r for r in rows if r["kernel"] == kernel]
        grid = [label for label, _ in tune.QUICK_GRIDS[kernel]]
        assert [r["status"] for r in mine] == ["baseline"] + ["ok"] * (len(mine) - 1), (kernel, mine)
        # Every candidate of the grid, in order; then at most one merged candidate of the winners.
        assert [r["config"] for r in mine[1:len(grid) + 1]] == grid
        assert all(r["config"].startswith("combined: ") for r in mine[len(grid) + 1:]) and len(mine) <= len(grid) + 2
        for r in mine:
            assert float(r["median_ms"]) > 0 and float(r["ratio_to_floor"]) > 0
    assert (tmp_path / "tune_gpu.md").read_text().count("## ") == len(tune.KERNELS) + 1  # + the winners
    assert "winners" in proc.stdout


def test_check_tolerances():
    """bf16-rounding-sized differences pass; a wrong gradient, a non-finite value or a 2e-3 log-prob shift fail."""
    tune = _load()
    torch.manual_seed(0)
    grad = torch.randn(256, 64).to(torch.bfloat16)
    logp = -10 * torch.rand(256)
    ref = [("logp", logp, tune.TOK), ("grad", grad, tune.GRAD)]

    one_ulp = (grad.float() * (1 + 2.0**-8)).to(torch.bfloat16)  # a rounding flip on every element
    assert tune.check([("logp", logp + 5e-4, tune.TOK), ("grad", one_ulp, tune.GRAD)], ref)[0]
    assert not tune.check([("logp", logp + 2e-3, tune.TOK), ("grad", grad, tune.GRAD)], ref)[0]
    wrong = grad.clone()
    wrong[3, :32] = 0  # one missing tile
    assert not tune.check([("logp", logp, tune.TOK), ("grad", wrong, tune.GRAD)], ref)[0]
    nan = grad.clone()
    nan[0, 0] = math.nan
    ok, detail = tune.check([("logp", logp, tune.TOK), ("grad", nan, tune.GRAD)], ref)
    assert not ok and "too far" in detail


def test_combined_candidate_takes_one_winner_per_group():
    """Fastest first; a second tile shape or a num_warps change (shared by both linear tiles) is not merged."""
    tune = _load()

    def row(label, ms, **over):
        return tune.Row("k", label, median_ms=ms, status="ok", over=over)

    rows = [row("default", 100.0), row("mm 256x128", 80.0, mm_block_m=256), row("mm 128x256", 82.0, mm_block_n=256),
            row("64x128 warps=4", 85.0, block_n=64, num_warps=4), row("chunk", 90.0, chunk_v=16384),
            row("noise", 99.5, tiles_per_split=32)]
    merged, labels = tune._merge_winners(rows, 100.0)
    assert merged == {"mm_block_m": 256, "chunk_v": 16384} and labels == ["mm 256x128", "chunk"]
    assert tune._merge_winners(rows[:3], 100.0) == ({}, [])  # two winners of one group: nothing to merge
    ppo = [row("bwd", 90.0, **{"bwd.num_warps": 8}), row("fwd", 95.0, **{"fwd.BLOCK_V": 1024})]
    assert tune._merge_winners(ppo, 100.0)[0] == {"bwd.num_warps": 8, "fwd.BLOCK_V": 1024}
