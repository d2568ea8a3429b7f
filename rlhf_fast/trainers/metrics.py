"""Metrics sinks: JSONL (always), TensorBoard (when installed), PNG plots at the end (when matplotlib is)."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional


class MetricsLogger:
    """Appends one JSON object per logged step to ``{out_dir}/metrics.jsonl`` and keeps them in ``history``."""

    def __init__(self, out_dir: str, *, report_to: Iterable[str] = ("jsonl",), prefix: str = ""):
        self.out_dir = out_dir
        self.prefix = prefix
        self.history: list[dict] = []
        os.makedirs(out_dir, exist_ok=True)
        report_to = set(report_to or ())
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl") if "jsonl" in report_to else None
        self._tensorboard = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self._tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self._tensorboard = None

    def log(self, metrics: dict, step: int) -> dict:
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(record)
        if self.jsonl_path:
            with open(self.jsonl_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{self.prefix}{key}", value, step)
        return record

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def plot_metrics(history: list[dict], path: str, keys: Optional[list[str]] = None, title: str = "") -> Optional[str]:
    """One small panel per metric against ``step``; returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history:
        return None
    if keys is None:
        keys = sorted({k for rec in history for k, v in rec.items() if k != "step" and isinstance(v, (int, float))})
    keys = [k for k in keys if any(k in rec for rec in history)]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        points = [(rec["step"], rec[key]) for rec in history if isinstance(rec.get(key), (int, float))]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
