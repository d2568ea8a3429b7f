"""Benchmark harness shared by every op family.

``Bench.measure`` times one provider of one op (median of repeated runs: ``triton.testing.do_bench`` on CUDA, a
wall-clock timer on CPU), records peak extra memory (CUDA's allocator peak; on CPU the profiler's tensor allocations) and achieved
bandwidth / throughput, and keeps the rows. ``Bench.write`` emits a CSV (op, provider, shape, dtype, metric, value, device, commit), a markdown table
with speedups against each op's baseline, and one PNG bar chart per op.
"""
from __future__ import annotations

import csv
import functools
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

CSV_FIELDS = ("op", "provider", "shape", "dtype", "metric", "value", "device", "commit")


@functools.lru_cache(maxsize=None)
def commit_hash() -> str:
    """The commit of the package's checkout (not of the working directory), ``-dirty`` with local changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, timeout=5, cwd=here)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def cpu_time_ms(fn: Callable[[], Any], *, warmup: int, rep: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def cpu_peak_extra_mib(fn: Callable[[], Any]) -> Optional[float]:
    """Peak of the tensor memory one call of ``fn`` holds on the CPU beyond what existed before it (MiB).

    Read from the profiler's allocation events (each allocation and free, with its size), so it is exact for
    tensors and does not see the allocator's cached pages; memory outside PyTorch (numpy, Python) is not counted,
    nor is the free of a tensor made before the call (so the number is an upper bound). None when this torch's profiler does not expose the events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:
        return None
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def optional(label: str, load: Callable[[], Any]) -> Any:
    """``load()`` for an optional peer baseline, or None (with the reason printed) when it is missing or broken."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - a missing or broken peer is skipped, not a crash of the family
        while exc.__cause__ is not None:  # TRL's lazy modules wrap the import error that says what is missing
            exc = exc.__cause__
        reason = (str(exc).splitlines() or [""])[0][:100]
        print(f"  skipped {label}: {type(exc).__name__}: {reason}")
        return None


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device_index: int = 0) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second): the roofline we quote."""
    import triton.testing

    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=f"cuda:{device_index}")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


@dataclass
class Row:
    op: str
    provider: str
    shape: str
    dtype: str
    metric: str
    value: float


@dataclass
class Bench:
    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list = field(default_factory=list)
    baselines: dict = field(default_factory=dict)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def measure(
        self,
        op: str,
        provider: str,
        shape: str,
        dtype: str,
        fn: Callable[[], Any],
        *,
        bytes_moved: Optional[float] = None,
        flops: Optional[float] = None,
        baseline: bool = False,
        rep: Optional[int] = None,
    ) -> Optional[float]:
        """Time ``fn``; returns the median ms, or None when the provider failed (recorded as an ``error`` row)."""
        if baseline:
            self.baselines[(op, shape, dtype)] = provider
        try:
            times, peak_mib = self._time(fn, rep)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # an OOM or unsupported input is a result too
            print(f"  {op:28s} {provider:24s} {shape:24s} failed: {str(exc).splitlines()[0][:80]}")
            self.rows.append(Row(op, provider, shape, dtype, "error", float("nan")))
            return None
        return self.record(op, provider, shape, dtype, times, peak_mib=peak_mib, bytes_moved=bytes_moved,
                           flops=flops)

    def record(self, op, provider, shape, dtype, times: list, *, peak_mib=None, bytes_moved=None, flops=None,
               baseline: bool = False, extra_metrics: Optional[dict] = None) -> float:
        """Rows for times (ms) measured elsewhere, e.g. in a fresh process with its peak memory (and any
        ``extra_metrics``, name -> value, for the CSV); returns the median ms."""
        if baseline:
            self.baselines[(op, shape, dtype)] = provider
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        median_ms, spread_ms = statistics.median(times), quartiles[2] - quartiles[0]
        self._add(op, provider, shape, dtype, "ms", median_ms)
        self._add(op, provider, shape, dtype, "ms_iqr", spread_ms)
        if peak_mib is not None:
            self._add(op, provider, shape, dtype, "peak_extra_mib", peak_mib)
        for metric, value in (extra_metrics or {}).items():
            self._add(op, provider, shape, dtype, metric, value)
        extra = ""
        if bytes_moved:
            gbps = bytes_moved / (median_ms * 1e-3) / 1e9
            self._add(op, provider, shape, dtype, "gbps", gbps)
            extra = f" {gbps:8.1f} GB/s"
            if self.on_cuda:
                pct = 100.0 * gbps / copy_bandwidth_gbps(self.device.index or 0)
                self._add(op, provider, shape, dtype, "pct_copy_bw", pct)
                extra += f" ({pct:5.1f}% of copy)"
        if flops:
            tflops = flops / (median_ms * 1e-3) / 1e12
            self._add(op, provider, shape, dtype, "tflops", tflops)
            extra += f" {tflops:7.2f} TFLOP/s"
        mem = f" {peak_mib:9.1f} MiB extra" if peak_mib is not None else ""
        print(f"  {op:28s} {provider:24s} {shape:24s} {median_ms:10.4f} ms{mem}{extra}")
        return median_ms

    def _time(self, fn, rep):
        if self.on_cuda:
            import triton.testing

            fn()  # compile / autotune outside the measurement
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            times = triton.testing.do_bench(fn, warmup=25, rep=rep or (20 if self.quick else 100), return_mode="all")
        else:
            reps = rep or (3 if self.quick else 10)
            times = cpu_time_ms(fn, warmup=1, rep=reps)
            peak = cpu_peak_extra_mib(fn)
        return times, peak

    def _add(self, op, provider, shape, dtype, metric, value):
        self.rows.append(Row(op, provider, shape, dtype, metric, float(value)))

    # ---- output -------------------------------------------------------------------------------------------
    def write(self, out_dir: str, stem: str = "results", plots: bool = True) -> dict:
        os.makedirs(out_dir, exist_ok=True)
        paths = {
            "csv": os.path.join(out_dir, f"{stem}.csv"),
            "markdown": os.path.join(out_dir, f"{stem}.md"),
        }
        device, commit = device_name(self.device), commit_hash()
        with open(paths["csv"], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_FIELDS)
            for r in self.rows:
                writer.writerow([r.op, r.provider, r.shape, r.dtype, r.metric, f"{r.value:.6g}", device, commit])
        with open(paths["markdown"], "w") as handle:
            handle.write(self.markdown(device, commit))
        paths["plots"] = self.plot(out_dir) if plots else []
        return paths

    def _table(self):
        """(op, shape, dtype) -> provider -> metric -> value."""
        table: dict = {}
        for r in self.rows:
            table.setdefault((r.op, r.shape, r.dtype), {}).setdefault(r.provider, {})[r.metric] = r.value
        return table

    def markdown(self, device: str, commit: str) -> str:
        lines = [f"# rlhf_fast benchmarks\n\nDevice: {device}; commit {commit}; quick={self.quick}\n"]
        for (op, shape, dtype), providers in self._table().items():
            base = self.baselines.get((op, shape, dtype))
            base_ms = providers.get(base, {}).get("ms") if base else None
            lines.append(f"\n## {op} {shape} {dtype}\n")
            lines.append(f"| provider | median ms | IQR ms | speedup vs {base or '-'} | peak extra MiB | GB/s | % copy BW | TFLOP/s |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for provider, metrics in providers.items():
                ms = metrics.get("ms")
                speed = f"{base_ms / ms:.2f}x" if base_ms and ms else "-"
                lines.append(
                    f"| {provider} | {_fmt(ms)} | {_fmt(metrics.get('ms_iqr'))} | {speed} | "
                    f"{_fmt(metrics.get('peak_extra_mib'))} | {_fmt(metrics.get('gbps'))} | "
                    f"{_fmt(metrics.get('pct_copy_bw'))} | {_fmt(metrics.get('tflops'))} |"
                    if "error" not in metrics else f"| {provider} | failed | | | | | | |"
                )
        return "\n".join(lines) + "\n"

    def plot(self, out_dir: str) -> list:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_op: dict = {}
        for (op, shape, dtype), providers in self._table().items():
            for provider, metrics in providers.items():
                if "ms" in metrics:
                    by_op.setdefault(op, []).append((f"{shape}\n{dtype}", provider, metrics["ms"]))
        paths = []
        for op, entries in by_op.items():
            cases = list(dict.fromkeys(e[0] for e in entries))
            providers = list(dict.fromkeys(e[1] for e in entries))
            width = 0.8 / len(providers)
            fig, ax = plt.subplots(figsize=(max(4, 2 + 1.6 * len(cases)), 3.2))
            for i, provider in enumerate(providers):
                xs = [cases.index(c) + i * width for c, p, _ in entries if p == provider]
                ys = [ms for _, p, ms in entries if p == provider]
                ax.bar(xs, ys, width, label=provider)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=7)
            ax.set_ylabel("median ms (lower is better)")
            ax.set_yscale("log")
            ax.set_title(op)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(out_dir, re.sub(r"[^\w.-]+", "_", op).strip("_") + ".png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
        return paths


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"
