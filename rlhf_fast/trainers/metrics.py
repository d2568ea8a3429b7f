"""Metrics sinks: JSONL (always), TensorBoard (when installed), PNG plots at the end (when matplotlib is)."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional


class MetricsLogger:
    """Appends one JSON object per logged step to ``{out_dir}/metrics.jsonl`` and keeps them in ``history``.

    ``fresh=True`` (a new run) starts a new ``metrics.jsonl``: a run never mixes its records with those of an
    earlier run in the same directory. A resumed run calls ``restart(step, history)`` once it knows the
    checkpoint's step: the file is rewritten with the records up to that step, and TensorBoard drops events
    after it, so the resumed steps are not logged twice.
    """

    def __init__(self, out_dir: str, *, report_to: Iterable[str] = ("jsonl",), prefix: str = "", fresh: bool = True):
        self.out_dir = out_dir
        self.prefix = prefix
        self.history: list[dict] = []
        os.makedirs(out_dir, exist_ok=True)
        report_to = set(report_to or ())
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl") if "jsonl" in report_to else None
        if self.jsonl_path and fresh:
            open(self.jsonl_path, "w", encoding="utf-8").close()
        self._tensorboard = None
        if "tensorboard" in report_to:
            self._tensorboard = _summary_writer(os.path.join(out_dir, "tensorboard"))

    def restart(self, step: int, history: Optional[list[dict]] = None) -> None:
        """Continue a run from ``step``: keep ``history`` (the checkpoint's records; default: the records of the
        existing file) up to ``step`` and rewrite ``metrics.jsonl`` with them."""
        if history is None:
            history = []
            if self.jsonl_path and os.path.isfile(self.jsonl_path):
                with open(self.jsonl_path, encoding="utf-8") as handle:
                    history = [json.loads(line) for line in handle if line.strip()]
        self.history = [dict(r) for r in history if int(r.get("step", 0)) <= step]
        if self.jsonl_path:
            with open(self.jsonl_path, "w", encoding="utf-8") as handle:
                for record in self.history:
                    handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            folder = self._tensorboard.log_dir
            self._tensorboard.close()
            self._tensorboard = _summary_writer(folder, purge_step=step + 1)

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


def _summary_writer(folder: str, purge_step: Optional[int] = None):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        return SummaryWriter(folder, purge_step=purge_step)
    except Exception:  # noqa: BLE001 - TensorBoard is optional
        return None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_metric(value, spec: str = ".3f") -> str:
    """``value`` for a progress bar: a number with ``spec``; NaN, infinities (also as the strings a record holds)
    and other values as they are."""
    if isinstance(value, str):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


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
