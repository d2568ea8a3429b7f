"""Argument checks shared by the C++ and the Python paths of the batcher.

Every check runs in Python before either path is called, so both paths refuse bad input with the same
exception type and the same message: the argument name, what was expected, and what was received.
"""
from __future__ import annotations

import numbers

import numpy as np

try:  # torch is a package dependency, but the batcher itself only needs NumPy
    import torch
except ImportError:  # pragma: no cover - torch is always installed with rlhf_fast
    torch = None

# int64 sums of 2**62 leave room for the doubled values the refinement step compares.
_INT_LIMIT = 2**62


def to_numpy(value):
    """NumPy view of a torch tensor (detached, on CPU; bfloat16 widened to float32, exactly); else the value."""
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return value


def check_positive_int(name: str, value) -> int:
    """A plain or NumPy integer >= 1 (bool refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    return int(value)


def check_lengths(name: str, value, *, minimum: int) -> np.ndarray:
    """A 1-D sequence of integers, each >= minimum, as a fresh int64 array."""
    array = to_numpy(value)
    if not isinstance(array, np.ndarray):
        try:
            array = np.asarray(array)
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"{name}: expected a 1-D sequence of integers, got {type(value).__name__} ({exc})")
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of integers, got shape {array.shape}")
    if array.size and (array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name}: expected integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size:
        low = int(array.min())
        if low < minimum:
            where = int(np.argmax(array < minimum))
            raise ValueError(f"{name}: expected values >= {minimum}, got {low} at index {where}")
        if int(array.max()) >= _INT_LIMIT // max(array.size, 1):
            raise ValueError(f"{name}: expected values whose sum fits in int64, got a maximum of {int(array.max())}")
    return array


def workload_weights(lengths: np.ndarray, workload) -> np.ndarray:
    """Per-sequence cost that the partition balances.

    ``None`` or ``"tokens"``: the length. ``"attention"``: ``length**2`` (the attention score matrix).
    ``(a, b)``: ``a * length + b * length**2``; for a transformer with hidden size ``d`` roughly ``(6 * d, 1)``
    counts both the dense layers and attention. Integer coefficients give int64 weights, float coefficients
    float64 weights; both paths then do the same arithmetic, so ties resolve identically.
    """
    if workload is None or (isinstance(workload, str) and workload == "tokens"):
        return lengths
    if isinstance(workload, str):
        if workload != "attention":
            raise ValueError(f"workload: expected None, 'tokens', 'attention' or (a, b), got {workload!r}")
        coefficients = (0, 1)
    else:
        coefficients = tuple(workload) if isinstance(workload, (tuple, list)) else None
        if coefficients is None or len(coefficients) != 2:
            raise ValueError(f"workload: expected None, 'tokens', 'attention' or (a, b), got {workload!r}")
    for c in coefficients:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Real):
            raise TypeError(f"workload: expected real coefficients (a, b), got {workload!r}")
        if not (c >= 0 and np.isfinite(c)):
            raise ValueError(f"workload: expected finite coefficients >= 0, got {workload!r}")
    a, b = coefficients
    if all(isinstance(c, numbers.Integral) for c in coefficients):
        peak = int(a) * int(lengths.max(initial=0)) + int(b) * int(lengths.max(initial=0)) ** 2
        if peak * max(lengths.size, 1) >= _INT_LIMIT:
            raise ValueError(f"workload: integer weights {workload!r} overflow int64 here; pass float coefficients")
        return int(a) * lengths + int(b) * lengths * lengths
    as_float = lengths.astype(np.float64)
    return float(a) * as_float + float(b) * as_float * as_float


def check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
