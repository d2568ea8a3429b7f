"""Time a small grid of launch configs for the hottest Triton kernels on one GPU, within a hard time budget.

None of the static launch tables (``linear.kernel_config``, ``logprobs.forward_config`` / ``backward_config``)
has been timed on a GPU: they were chosen by compiling for sm_90 without one. One run of this script gives a
short GPU session what it needs to set them:

    kernel (bf16)                   shape                          what varies                       floor
    linear_logprobs fwd (no grad)   hidden N=8192 H=4096 V=151936  logit tile, warps, stages, split  hidden @ weight.T
    linear_logprobs fwd+bwd         (same)                         d_hidden / d_weight tiles, chunk_v  3 plain matmuls
    fused_ppo_loss fwd+bwd          logits B=4 T=2048 V=151936     stats pass fwd.*, gradient bwd.*  1.5 x D2D copy
    selective_log_softmax fwd       (same)                         BLOCK_V, num_warps                0.5 x D2D copy

Candidates are overrides of the module's own config (the ``default`` row), injected by monkeypatching the config
functions where the launchers look them up; the kernel files are not touched. Every candidate runs once and is
checked against the default's outputs on the same inputs (per-token values 1e-3 absolute, gradients to a bf16
tolerance) before it is timed with ``triton.testing.do_bench``; one that fails to compile, runs out of resources
or mismatches is reported and skipped. ``fused_ppo_loss`` is timed out of place (leaf logits): the in-place path
would turn the logits into gradients after one call and make every later call skip its (now clipped) rows.

Budget: everything (imports, CUDA init, every Triton compile) fits in ``--budget-s`` seconds of wall time. Each
kernel gets a share of what is left when it starts, a candidate is only launched when the slowest one so far
would still fit, and the CSV / markdown are rewritten after every candidate, so a kill loses at most one row.
Winners that beat the default by more than 1% on independent settings (``GROUPS``) are also tried merged, as
``combined``; the linear forward's winner is also tried in the fwd+bwd sweep (it sets the same logit tile).

    python benchmarks/tune_gpu.py [--budget-s 150] [--out bench_out/tune_gpu]
    TRITON_INTERPRET=1 python benchmarks/tune_gpu.py --quick --device cpu   # tiny shapes, 2 candidates, CPU
"""
from __future__ import annotations

import time

_T0 = time.monotonic()  # the budget counts from here: imports and CUDA init are part of it

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

if "--quick" in sys.argv and ("cpu" in sys.argv or "--device=cpu" in sys.argv or not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, at import below

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from rlhf_fast import reference  # noqa: E402
from rlhf_fast.bench.harness import commit_hash, cpu_time_ms, device_name  # noqa: E402
from rlhf_fast.kernels import fused_loss as fl  # noqa: E402
from rlhf_fast.kernels import linear as lin  # noqa: E402
from rlhf_fast.kernels import logprobs as lp  # noqa: E402

K_LIN_FWD = "linear_logprobs fwd (no grad)"
K_LIN_STEP = "linear_logprobs fwd+bwd"
K_PPO = "fused_ppo_loss fwd+bwd"
K_SLS = "selective_log_softmax fwd"
# Run order and share of the budget. The linear kernels come first (compute-bound: the tile matters most; the
# forward winner seeds the fwd+bwd grid); the bandwidth-bound logits kernels compile and run in about a second.
KERNELS = {K_LIN_FWD: 0.2, K_LIN_STEP: 0.45, K_PPO: 0.2, K_SLS: 0.15}
PRIOR_S = {K_LIN_FWD: 4.0, K_LIN_STEP: 8.0, K_PPO: 2.0, K_SLS: 2.0}  # cost guess of a kernel's first candidate
RESERVE_S = 2.0  # kept back for the last write

TOK, GRAD = "tok", "grad"  # output kinds: per-token / scalar values (1e-3 abs) and gradients (bf16 tolerance)
TOK_ATOL = 1e-3
GRAD_RTOL, GRAD_ATOL_FRAC = 2e-2, 2e-3  # |a - b| <= 2e-2 |b| + 2e-3 max|b|: a few bf16 ulps, ~0 for a wrong tile

GRPO = dict(kl_coef=0.04, kl_estimator="k3", temperature=0.9, clip_low=0.2, clip_high=0.28,
            agg="seq-mean-token-mean")

# ---- candidate grids: (label, overrides of the default config); default first, then most telling first -----
# linear forward (_lse_partials_kernel), default 128x128x32 tiles, 8 warps, 4 stages, 16 tiles per split.
# Compiled for sm_90 with triton 3.9 (meta tensors, no GPU): every entry uses wgmma, fits in 255 registers
# without spills (block_k=64 + 4 stages: 8 bytes) and in <= 128 KB of shared memory; 128x256 tiles and 4 warps on
# 128x128 spill 400-800 bytes and are left out. 128x128 with 8 warps uses all registers (one CTA per SM), so
# the 64-row tiles with 4 warps (two CTAs per SM: one's softmax epilogue hides under the other's matmul) are
# the other family. Fewer, longer K steps (block_k=64) halve the loop overhead per tile.
LIN_FWD_GRID = [
    ("default", {}),
    ("block_k=64 stages=3", dict(block_k=64, num_stages=3)),
    ("64x128 warps=4", dict(block_n=64, num_warps=4)),
    ("64x256 stages=3", dict(block_n=64, block_v=256, num_stages=3)),
    ("64x128x64 warps=4 stages=3", dict(block_n=64, num_warps=4, block_k=64, num_stages=3)),
    ("stages=3", dict(num_stages=3)),
    ("stages=5", dict(num_stages=5)),
    ("block_k=64 stages=4", dict(block_k=64, num_stages=4)),
    ("tiles_per_split=32", dict(tiles_per_split=32)),
]
# linear backward, default d_hidden / d_weight tiles 128x128x64 with 3 stages (96 KB, ~106 registers: two CTAs
# per SM; the accumulating d_hidden variant needs 182, so one) and chunk_v=8192. 128x256x64 with 3 stages is Triton's usual Hopper GEMM tile (144 KB, 194 registers; the
# accumulating d_hidden variant spills 176 bytes in its epilogue only). A bigger chunk_v means fewer
# read-modify-write passes over the fp32 d_hidden (19 -> 10), a smaller one keeps the dz buffer nearer L2.
# The forward sweep's winner is inserted after the default (it also sets the logit-gradient kernel's tile).
LIN_STEP_GRID = [
    ("default", {}),
    ("mm 128x256x64", dict(mm_block_n=256)),
    ("chunk_v=16384", dict(chunk_v=16384)),
    ("mm_stages=4", dict(mm_num_stages=4)),
    ("mm 256x128x64", dict(mm_block_m=256)),
    ("block_k=64 stages=3", dict(block_k=64, num_stages=3)),
    ("mm_block_k=128 mm_stages=2", dict(mm_block_k=128, mm_num_stages=2)),
    ("chunk_v=4096", dict(chunk_v=4096)),
    # The logit-gradient kernel's own tile (LinearConfig.grad_*; it defaults to the forward's) and the matmuls'
    # own warps (mm_num_warps). sm_90 compile here: grad 64x128 with 4 warps and 128x128x64 with 8 warps / 3
    # stages do not spill; grad 128x128 with 4 warps spills 640 B and the 128x128 matmuls with 4 warps 0.9-1.6 KB,
    # so the matmuls keep 8 warps when the logit tile drops to 4.
    ("grad 64x128 warps=4", dict(grad_block_n=64, grad_num_warps=4)),
    ("grad block_k=64 stages=3", dict(grad_block_k=64, grad_num_stages=3)),
    ("logit 64x128 warps=4, mm warps=8", dict(block_n=64, num_warps=4, mm_num_warps=8)),
    # The weight-gradient GEMM by torch.mm (cuBLAS) instead of the Triton kernel (RLHF_FAST_LINEAR_DWEIGHT).
    ("d_weight by cuBLAS", dict(dweight="torch")),
]
# logits kernels: one program per row, bandwidth-bound. Their loads feed no tl.dot, so Triton does not pipeline
# them (no shared memory at any num_stages: num_stages is left alone); what matters is the bytes in flight per
# SM, BLOCK_V x num_warps / occupancy. Defaults: stats pass 2048 / 1 warp, gradient pass 4096 / 16 warps.
# bwd.* is the gradient pass (read + write: 2/3 of the loss's traffic), fwd.* the loss's stats pass.
PPO_GRID = [
    ("default", {}),
    ("bwd warps=8", {"bwd.num_warps": 8}),
    ("bwd V=8192 warps=8", {"bwd.BLOCK_V": 8192, "bwd.num_warps": 8}),
    ("bwd warps=4", {"bwd.num_warps": 4}),
    ("fwd V=4096 warps=4", {"fwd.BLOCK_V": 4096, "fwd.num_warps": 4}),
    ("bwd V=8192", {"bwd.BLOCK_V": 8192, "bwd.num_warps": 16}),
    ("bwd V=2048 warps=4", {"bwd.BLOCK_V": 2048, "bwd.num_warps": 4}),
    ("fwd V=8192 warps=8", {"fwd.BLOCK_V": 8192, "fwd.num_warps": 8}),
    ("bwd V=16384", {"bwd.BLOCK_V": 16384, "bwd.num_warps": 16}),
    ("fwd V=1024", {"fwd.BLOCK_V": 1024, "fwd.num_warps": 1}),
]
SLS_GRID = [
    ("default", {}),
    ("V=4096 warps=4", {"BLOCK_V": 4096, "num_warps": 4}),
    ("V=2048 warps=2", {"BLOCK_V": 2048, "num_warps": 2}),
    ("V=8192 warps=8", {"BLOCK_V": 8192, "num_warps": 8}),
    ("V=1024 warps=1", {"BLOCK_V": 1024, "num_warps": 1}),
    ("V=4096 warps=2", {"BLOCK_V": 4096, "num_warps": 2}),
    ("V=8192 warps=4", {"BLOCK_V": 8192, "num_warps": 4}),
    ("V=16384 warps=8", {"BLOCK_V": 16384, "num_warps": 8}),
]
# --quick: tiny tiles the interpreter runs in milliseconds, still several splits / chunks / masked edges.
QUICK_GRIDS = {
    K_LIN_FWD: [("default", {}), ("block_v=16 tiles_per_split=3", dict(block_v=16, tiles_per_split=3))],
    K_LIN_STEP: [("default", {}), ("mm_block_m=32 mm_stages=2", dict(mm_block_m=32, mm_num_stages=2)),
                 ("d_weight by torch.mm", dict(dweight="torch"))],
    K_PPO: [("default", {}), ("bwd V=128 fwd V=64", {"bwd.BLOCK_V": 128, "bwd.num_warps": 2, "fwd.BLOCK_V": 64})],
    K_SLS: [("default", {}), ("V=128 warps=2", {"BLOCK_V": 128, "num_warps": 2})],
}


# Settings that only make sense together: a ``combined`` candidate takes at most one winner per group. Two
# winning tile shapes (256x128, 128x256) must not merge into a 256x256 tile, and num_warps belongs to both
# linear tiles: 4 warps on the 128x256 matmul tile spill 2.8 KB per thread (sm_90 compile).
GROUPS = {**dict.fromkeys(("block_n", "block_v", "block_k", "num_stages"), ("logit tile",)),
          **dict.fromkeys(("mm_block_m", "mm_block_n", "mm_block_k", "mm_num_stages", "mm_num_warps"),
                          ("matmul tile",)),
          **dict.fromkeys(("grad_block_n", "grad_block_v", "grad_block_k", "grad_num_warps", "grad_num_stages"),
                          ("gradient tile",)),
          "num_warps": ("logit tile", "matmul tile", "gradient tile")}


def _groups(over: dict) -> set:
    return {g for k in over for g in GROUPS.get(k, (k.split(".")[0],))}  # "fwd.BLOCK_V" -> "fwd"


class Abort(Exception):
    """The CUDA context is broken (a sticky error): no later launch can succeed."""


class patched:
    """Install ``module.name = fn`` for each triple while active, counting calls: a config function the launchers
    stopped looking up (renamed, cached, imported by value) fails the candidate instead of re-timing the default."""

    def __init__(self, *triples, env=None):
        self.triples, self.calls, self.saved = triples, {}, []
        self.env = {k: v for k, v in (env or {}).items() if v is not None}  # variables set while active
        self.saved_env = {}

    def __enter__(self):
        for key, value in self.env.items():
            self.saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        for module, name, fn in self.triples:
            self.saved.append((module, name, getattr(module, name)))
            setattr(module, name, self._counted(f"{module.__name__}.{name}", fn))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self.saved):
            setattr(module, name, fn)
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def _counted(self, key, fn):
        self.calls[key] = 0

        def wrapper(*args, **kwargs):
            self.calls[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    def unused(self) -> list:
        return [key for key, count in self.calls.items() if count == 0]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:140] if text else ''}"


def _tok_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if b.numel() else 0.0


def _grad_err(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 26) -> float:
    """Largest ``|a - b| - rtol |b|`` over the largest ``|b|`` (nan if any is not finite); chunked, so a
    [151936, 4096] gradient never has a full float32 copy."""
    a, b = a.reshape(-1), b.reshape(-1)
    scale = b.abs().max().float().item() if b.numel() else 0.0
    worst = 0.0
    for s in range(0, b.numel(), chunk):
        x, y = a[s : s + chunk].float(), b[s : s + chunk].float()
        excess = ((x - y).abs() - GRAD_RTOL * y.abs()).max().item()
        if not math.isfinite(excess):
            return math.nan
        worst = max(worst, excess)
    return worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)


def check(out, ref) -> tuple[bool, str]:
    """Compare a candidate's outputs to the default's: ``[(name, tensor, kind)]`` each."""
    ok, notes = True, []
    for (name, a, kind), (_, b, _) in zip(out, ref):
        if a.shape != b.shape:
            return False, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if kind == TOK:
            err = _tok_err(a, b)
            good = err <= TOK_ATOL
        else:
            err = _grad_err(a, b)
            good = err <= GRAD_ATOL_FRAC
        ok &= bool(good)
        notes.append(f"{name} {err:.1e}{'' if good else ' (too far)'}")
    return ok, "err " + ", ".join(notes)


@dataclasses.dataclass
class Row:
    kernel: str
    config: str
    median_ms: float = math.nan
    ratio_to_floor: float = math.nan
    speedup_vs_default: float = math.nan
    throughput: float = math.nan
    unit: str = ""
    status: str = ""
    detail: str = ""
    full_config: str = ""
    over: dict = dataclasses.field(default_factory=dict)  # the overrides (not written)


ROW_FIELDS = [f.name for f in dataclasses.fields(Row) if f.name != "over"]
CSV_FIELDS = ROW_FIELDS + ["shape", "dtype", "device", "commit"]


class Tuner:
    def __init__(self, args, device: torch.device):
        self.quick, self.device, self.out_dir = args.quick, device, args.out
        self.cuda = device.type == "cuda"
        self.deadline = _T0 + args.budget_s - RESERVE_S
        self.pending = dict(KERNELS)  # kernels not yet started -> budget weight
        self.rows: list[Row] = []
        self.meta: dict = {}  # kernel -> (shape, dtype)
        self.winners: dict = {}  # kernel -> Row
        self.target_ms = 50.0 if args.quick else 300.0  # timed work per candidate (do_bench 'rep')
        self.dev_name, self.commit = device_name(device), commit_hash()

    # ---- budget -------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, kernel: str, shape: str, dtype: torch.dtype) -> float:
        """Mark ``kernel`` started; returns the end of its share of the remaining budget."""
        weights = sum(self.pending.values())
        share = self.pending.pop(kernel) / weights if weights else 1.0
        self.meta[kernel] = (shape, str(dtype).replace("torch.", ""))
        print(f"\n== {kernel} {shape} {self.meta[kernel][1]} (share {share * max(self.left(), 0):.0f} s of "
              f"{max(self.left(), 0):.0f} s left)", flush=True)
        return time.monotonic() + share * max(self.left(), 0.0)

    def drop(self, kernels, status: str, detail: str):
        """Give up the kernels of ``kernels`` not started yet (their budget share goes to the others)."""
        for kernel in kernels:
            if self.pending.pop(kernel, None) is not None:
                self.add(Row(kernel, "-", status=status, detail=detail))

    # ---- timing -------------------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn, end: float, slow_ms: float = math.inf) -> tuple[float, str]:
        """Median ms of ``fn`` (already run once, so compiled). A candidate slower than ``slow_ms`` or with no time
        left for a do_bench run is timed once: it is not a winner, a precise number would only cost budget."""
        if not self.cuda:
            return statistics.median(cpu_time_ms(fn, warmup=0, rep=1)), "1 run (CPU)"
        t = time.perf_counter()
        fn()
        self.sync()
        est = max((time.perf_counter() - t) * 1e3, 1e-3)
        room = (min(end, self.deadline) - time.monotonic()) * 1e3
        reps = min(max(5, int(self.target_ms / est)), 50, int(room / est) - 8)  # do_bench adds ~7 calls
        if est > slow_ms or reps < 3:
            return est, "1 run (slow)" if est > slow_ms else "1 run (no time for more)"
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=est, rep=reps * est, return_mode="all")
        return statistics.median(times), f"median of {len(times)}"

    # ---- rows ---------------------------------------------------------------------------------------------
    def add(self, row: Row):
        self.rows.append(row)
        ms = f"{row.median_ms:9.3f} ms" if math.isfinite(row.median_ms) else " " * 12
        thr = f"{row.throughput:8.1f} {row.unit}" if math.isfinite(row.throughput) else ""
        ratio = f"x{row.ratio_to_floor:5.2f} floor" if math.isfinite(row.ratio_to_floor) else ""
        print(f"  {row.config:34s} {ms} {ratio:12s} {thr:16s} {row.status} {row.detail}", flush=True)
        self.write()

    def baseline(self, kernel: str, label: str, fn, *, work: float, unit: str, end: float, ratio_to_floor=1.0):
        """Time a plain-torch baseline; returns its ms (None if it failed or there is no time left)."""
        if self.left() < 1.0:
            self.add(Row(kernel, label, status="skipped", detail="time budget"))
            return None
        try:
            fn()
            self.sync()
            ms, how = self.time_ms(fn, end)
        except Exception as exc:  # noqa: BLE001 - an OOM baseline is a result, not a crash
            self._after_error()
            self.add(Row(kernel, label, status="failed", detail=_short(exc)))
            return None
        self.add(Row(kernel, label, ms, ratio_to_floor, throughput=_throughput(work, ms, unit), unit=unit,
                     status="baseline", detail=how))
        return ms

    def _after_error(self):
        if not self.cuda:
            return
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            raise Abort(_short(exc)) from exc

    # ---- the sweep ----------------------------------------------------------------------------------------
    def sweep(self, kernel, grid, run, apply, describe, *, floor_ms, work, unit, end, combine) -> Row | None:
        """Check and time each candidate of ``grid``; returns the fastest ok row. ``run()`` calls the kernel and
        returns ``[(name, tensor, kind)]``; ``apply(overrides)`` is a context manager that installs a config."""
        ref, default_ms, costs = None, None, []
        grid = list(grid)
        tried = set()
        i = 0
        while i < len(grid):
            label, over = grid[i]
            i += 1
            key = tuple(sorted(over.items()))
            if key in tried:
                continue
            tried.add(key)
            row = Row(kernel, label, unit=unit, full_config=_safe(describe, over), over=over)
            guess = max(costs[1:]) if len(costs) > 1 else (costs[0] if costs else PRIOR_S[kernel])
            limit = self.deadline if not over else min(end, self.deadline)  # the default may use any time left
            if time.monotonic() + guess > limit:
                row.status, row.detail = "skipped", f"time budget (next needs ~{guess:.0f} s)"
                self.add(row)
                continue
            t0 = time.monotonic()
            try:
                with apply(over) as patch:
                    out = run()
                    self.sync()
                    if patch.unused():
                        raise RuntimeError(f"{patch.unused()} never called: the config did not reach the kernels")
                    if ref is None and not over:
                        ref, good, note = out, True, "reference for the others"
                    elif ref is None:
                        good, note = True, "the default failed: nothing to check against"
                    else:
                        good, note = check(out, ref)
                    del out
                    if good:
                        ms, how = self.time_ms(run, end, slow_ms=3 * default_ms if default_ms else math.inf)
            except Abort:
                raise
            except Exception as exc:  # noqa: BLE001 - compile errors, out of resources, OOM: a result
                self._after_error()
                row.status, row.detail = "failed", _short(exc)
            else:
                if not good:
                    row.status, row.detail = "mismatch", note
                else:
                    if not over:
                        default_ms = ms
                    row.median_ms, row.detail = ms, f"{how}; {note}"
                    row.status = "ok" if ref is not None else "unchecked"
                    row.ratio_to_floor = ms / floor_ms if floor_ms else math.nan
                    row.speedup_vs_default = default_ms / ms if default_ms else math.nan
                    row.throughput = _throughput(work, ms, unit)
            costs.append(time.monotonic() - t0)
            self.add(row)
            if combine and i == len(grid) and default_ms:
                merged, labels = _merge_winners([r for r in self.rows if r.kernel == kernel], default_ms)
                if merged and tuple(sorted(merged.items())) not in tried:
                    grid.append(("combined: " + " + ".join(labels), merged))
        ok = [r for r in self.rows if r.kernel == kernel and r.status in ("ok", "unchecked")]
        best = min(ok, key=lambda r: r.median_ms) if ok else None
        if best is not None:
            self.winners[kernel] = best
        return best

    # ---- output -------------------------------------------------------------------------------------------
    def write(self):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "tune_gpu.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_FIELDS)
            for r in self.rows:
                shape, dtype = self.meta.get(r.kernel, ("", ""))
                cells = [_cell(getattr(r, f)) for f in ROW_FIELDS]
                writer.writerow(cells + [shape, dtype, self.dev_name, self.commit])
        with open(os.path.join(self.out_dir, "tune_gpu.md"), "w") as handle:
            handle.write(self.markdown())

    def markdown(self) -> str:
        lines = [f"# Launch-config sweep\n\nDevice: {self.dev_name}; commit {self.commit}; quick={self.quick}. "
                 "`x floor`: median / floor (see each kernel); `vs default`: default ms / ms (> 1 is faster).\n"]
        for kernel in dict.fromkeys(r.kernel for r in self.rows):
            shape, dtype = self.meta.get(kernel, ("", ""))
            unit = next((r.unit for r in self.rows if r.kernel == kernel and r.unit), "")
            lines += [f"\n## {kernel} {shape} {dtype}\n",
                      f"| config | median ms | x floor | vs default | {unit or 'throughput'} | status | detail |",
                      "|---|---|---|---|---|---|---|"]
            for r in (r for r in self.rows if r.kernel == kernel):
                lines.append(f"| {r.config} | {_fmt(r.median_ms)} | {_fmt(r.ratio_to_floor)} | "
                             f"{_fmt(r.speedup_vs_default)} | {_fmt(r.throughput)} | {r.status} | {r.detail} |")
        lines += ["\n## Winners\n", "| kernel | winner | median ms | vs default | full config |",
                  "|---|---|---|---|---|"]
        for kernel, r in self.winners.items():
            lines.append(f"| {kernel} | {r.config} | {_fmt(r.median_ms)} | {_fmt(r.speedup_vs_default)} | "
                         f"`{r.full_config}` |")
        return "\n".join(lines) + "\n"

    def summary(self):
        print("\n== winners (fastest config that matched the default; keep the default unless vs default > ~1.02)")
        for kernel in KERNELS:
            r = self.winners.get(kernel)
            if r is None:
                print(f"  {kernel:32s} no ok candidate")
                continue
            print(f"  {kernel:32s} {r.config:34s} {r.median_ms:9.3f} ms  x{r.speedup_vs_default:.3f} vs default  "
                  f"x{r.ratio_to_floor:.2f} floor  {'' if r.status == 'ok' else r.status}\n      {r.full_config}")


def _known(over: dict, keys):
    """Launch options the default config does not set would be an error on GPU but are ignored by the
    interpreter: refuse them everywhere."""
    unknown = sorted(set(over) - set(keys))
    if unknown:
        raise KeyError(f"not in the default config: {unknown}")


def _throughput(work: float, ms: float, unit: str) -> float:
    return work / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)


def _safe(describe, over) -> str:
    try:
        return describe(over)
    except Exception as exc:  # noqa: BLE001 - e.g. an override naming a field that does not exist
        return f"invalid: {_short(exc)}"


def _merge_winners(rows, default_ms) -> tuple[dict, list]:
    """Overrides of the candidates that beat the default by > 1%, fastest first, skipping any that touches a
    group of settings already taken, and their labels; nothing unless at least two merge."""
    merged, labels = {}, []
    for r in sorted((r for r in rows if r.status == "ok" and r.median_ms < 0.99 * default_ms),
                    key=lambda r: r.median_ms):
        if r.over and not _groups(r.over) & _groups(merged):
            merged.update(r.over)
            labels.append(r.config)
    return (merged, labels) if len(labels) >= 2 else ({}, [])


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _fmt(value) -> str:
    return "-" if not math.isfinite(value) else f"{value:.4g}"


# ---- the kernels ---------------------------------------------------------------------------------------------
def tune_linear(t: Tuner):
    dev = t.device
    if t.quick:
        n, h, v = 48, 40, 200
        dtype = torch.bfloat16 if t.cuda else torch.float32  # the interpreter's bf16 tl.dot is garbage
    else:
        n, h, v, dtype = 8192, 4096, 151936, torch.bfloat16
    shape = f"N{n}xH{h}xV{v}"
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=dev) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=dev) * h**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=dev)
    grad_logp = torch.randn(n, device=dev)
    h0, w0 = hidden.detach(), weight.detach()
    base = lin.kernel_config(h, v, dtype, dev)

    def apply(over):
        over = dict(over)
        dweight = over.pop("dweight", None)  # RLHF_FAST_LINEAR_DWEIGHT: who computes the weight gradient
        cfg = dataclasses.replace(base, **over)
        return patched((lin, "kernel_config", lambda *_a, **_k: cfg), env={"RLHF_FAST_LINEAR_DWEIGHT": dweight})

    def describe(over):
        over = dict(over)
        dweight = over.pop("dweight", None)
        return repr(dataclasses.replace(base, **over)) + (f" RLHF_FAST_LINEAR_DWEIGHT={dweight}" if dweight else "")

    # ---- forward, no grad --------------------------------------------------------------------------------
    end = t.start(K_LIN_FWD, shape, dtype)
    flops = 2.0 * n * h * v
    with torch.no_grad():
        floor = t.baseline(K_LIN_FWD, "matmul x1 (floor)", lambda: h0 @ w0.t(), work=flops, unit="TFLOP/s", end=end)

    def forward():
        with torch.no_grad():
            logp, ent = lin.linear_logprobs(h0, w0, labels, return_entropy=True)
        return [("logp", logp, TOK), ("entropy", ent, TOK)]

    grid = QUICK_GRIDS[K_LIN_FWD] if t.quick else LIN_FWD_GRID
    best_fwd = t.sweep(K_LIN_FWD, grid, forward, apply, describe, floor_ms=floor, work=flops, unit="TFLOP/s",
                       end=end, combine=True)

    # ---- forward + backward ------------------------------------------------------------------------------
    end = t.start(K_LIN_STEP, shape, dtype)
    flops = 6.0 * n * h * v  # useful work: the kernels do 8 N H V (the logits are recomputed in the backward)

    def three_matmuls():
        with torch.no_grad():
            logits = h0 @ w0.t()
            return logits @ w0, logits.t() @ h0

    floor = t.baseline(K_LIN_STEP, "matmul x3 (floor)", three_matmuls, work=flops, unit="TFLOP/s", end=end)

    def step():
        logp = lin.linear_logprobs(hidden, weight, labels)
        d_hidden, d_weight = torch.autograd.grad(logp, (hidden, weight), grad_logp)
        return [("logp", logp.detach(), TOK), ("d_hidden", d_hidden, GRAD), ("d_weight", d_weight, GRAD)]

    grid = list(QUICK_GRIDS[K_LIN_STEP] if t.quick else LIN_STEP_GRID)
    if not t.quick and best_fwd is not None and best_fwd.over and best_fwd.speedup_vs_default > 1.01:
        # The matmuls keep their warps: the forward winner's num_warps is for the logit tile (4 warps spill there).
        over = dict(best_fwd.over)
        if "num_warps" in over:
            over.setdefault("mm_num_warps", base.num_warps)
        grid.insert(1, (f"fwd winner: {best_fwd.config}", over))
    t.sweep(K_LIN_STEP, grid, step, apply, describe, floor_ms=floor, work=flops, unit="TFLOP/s", end=end,
            combine=True)


def tune_logits(t: Tuner):
    dev = t.device
    b, steps, v = (2, 6, 300) if t.quick else (4, 2048, 151936)
    dtype = torch.bfloat16
    n = b * steps
    shape = f"B{b}xT{steps}xV{v}"
    torch.manual_seed(0)
    logits = (torch.randn(b, steps, v, device=dev) * 2).to(dtype)
    labels = torch.randint(0, v, (b, steps), device=dev)
    flat, flat_labels = logits.view(n, v), labels.view(n)
    nbytes = logits.numel() * logits.element_size()
    fwd_base, bwd_base = lp.forward_config, lp.backward_config

    def copy_logits():
        dst = torch.empty_like(logits)
        return lambda: dst.copy_(logits)

    # ---- fused PPO loss, forward + backward ----------------------------------------------------------------
    end = t.start(K_PPO, shape, dtype)
    copy_ms = t.baseline(K_PPO, "D2D copy of logits", copy_logits(), work=2 * nbytes, unit="GB/s", end=end,
                         ratio_to_floor=2 / 3)
    logp = reference.selective_log_softmax(flat, flat_labels, temperature=GRPO["temperature"]).view(b, steps)
    old = logp + 0.1 * torch.randn(b, steps, device=dev)
    ref_logp = logp + 0.1 * torch.randn(b, steps, device=dev)
    adv = torch.randn(b, device=dev).unsqueeze(-1).expand(b, steps)
    mask = torch.ones(b, steps, device=dev, dtype=torch.int64)
    mask[:, steps - max(1, steps // 8):] = 0  # padding at the end of every sequence
    x = logits.requires_grad_(True)  # a leaf: the loss writes its gradient out of place

    def ppo():
        loss, stats = fl.fused_ppo_loss(x, labels, old, adv, mask, ref_logp=ref_logp, inplace_grad=False, **GRPO)
        (grad,) = torch.autograd.grad(loss, x)
        values = torch.stack([stats[k] for k in sorted(stats)])
        return [("loss", loss.detach(), TOK), ("stats", values, TOK), ("d_logits", grad, GRAD)]

    def apply_ppo(over):
        fwd = {k[4:]: val for k, val in over.items() if k.startswith("fwd.")}
        bwd = {k[4:]: val for k, val in over.items() if k.startswith("bwd.")}
        _known(over, [f"fwd.{k}" for k in fwd_base(v)] + [f"bwd.{k}" for k in bwd_base(v)])
        return patched((fl, "forward_config", lambda vocab, **kw: {**fwd_base(vocab, **kw), **fwd}),
                       (lp, "backward_config", lambda vocab: {**bwd_base(vocab), **bwd}))

    def describe_ppo(over):
        fwd = {**fwd_base(v), **{k[4:]: val for k, val in over.items() if k.startswith("fwd.")}}
        bwd = {**bwd_base(v), **{k[4:]: val for k, val in over.items() if k.startswith("bwd.")}}
        return f"forward_config={fwd} backward_config={bwd}"

    floor = 1.5 * copy_ms if copy_ms else None  # two reads of the logits and one write of the gradient
    t.sweep(K_PPO, QUICK_GRIDS[K_PPO] if t.quick else PPO_GRID, ppo, apply_ppo, describe_ppo, floor_ms=floor,
            work=3 * nbytes, unit="GB/s", end=end, combine=True)
    x.requires_grad_(False)

    # ---- selective_log_softmax, no grad ---------------------------------------------------------------------
    end = t.start(K_SLS, shape, dtype)
    copy_ms = t.baseline(K_SLS, "D2D copy of logits", copy_logits(), work=2 * nbytes, unit="GB/s", end=end,
                         ratio_to_floor=2.0)

    def selective():
        with torch.no_grad():
            return [("logp", lp.selective_log_softmax(flat, flat_labels), TOK)]

    def apply_sls(over):
        _known(over, fwd_base(v))
        return patched((lp, "forward_config", lambda vocab, **kw: {**fwd_base(vocab, **kw), **over}))

    def describe_sls(over):
        return f"forward_config(with_entropy=False)={ {**fwd_base(v, with_entropy=False), **over} }"

    floor = copy_ms / 2 if copy_ms else None  # one read of the logits at copy bandwidth
    t.sweep(K_SLS, QUICK_GRIDS[K_SLS] if t.quick else SLS_GRID, selective, apply_sls, describe_sls,
            floor_ms=floor, work=nbytes + n * (labels.element_size() + 4), unit="GB/s", end=end,
            combine=False)  # one launch config: nothing to merge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall-time budget of the whole run")
    parser.add_argument("--out", default="bench_out/tune_gpu", help="directory for tune_gpu.csv / tune_gpu.md")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 candidates per kernel (CPU ok)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cpu" and not (args.quick and os.environ.get("TRITON_INTERPRET") == "1"):
        parser.error("on CPU only --quick runs (the Triton kernels under TRITON_INTERPRET=1)")
    t = Tuner(args, device)
    import triton

    print(f"{t.dev_name}; torch {torch.__version__}, triton {triton.__version__}; commit {t.commit}; "
          f"budget {args.budget_s:.0f} s ({t.left() + RESERVE_S:.0f} s left after imports)", flush=True)
    rc = 0
    for tune, kernels in ((tune_linear, (K_LIN_FWD, K_LIN_STEP)), (tune_logits, (K_PPO, K_SLS))):
        if rc == 2 or t.left() <= 0:
            break
        try:
            tune(t)
        except Abort as exc:
            print(f"CUDA context broken, stopping: {exc}", flush=True)
            rc = 2
        except Exception as exc:  # noqa: BLE001 - e.g. OOM while allocating inputs: the other family still runs
            print(f"  {tune.__name__} failed: {_short(exc)}", flush=True)
            t.drop(kernels, "failed", f"not run: {_short(exc)}")
            rc = 1
            try:
                t._after_error()
            except Abort:
                rc = 2
        if t.cuda and rc != 2:
            torch.cuda.empty_cache()
    t.drop(list(t.pending), "skipped", "time budget" if rc != 2 else "stopped: CUDA context broken")
    t.write()
    t.summary()
    print(f"\nwrote {os.path.join(args.out, 'tune_gpu.csv')} and tune_gpu.md in {time.monotonic() - _T0:.1f} s "
          f"(budget {args.budget_s:.0f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
