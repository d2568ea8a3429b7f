"""Argument checks shared by the C++ and the Python paths of the batcher.

Every check runs in Python before either path is called, so both paths refuse bad input with the same
exception type and the same message: the argument name, what was expected, and what was received.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

try:  # torch is a package dependency, but the batcher itself only needs NumPy
    import torch
except ImportError:  # pragma: no cover - torch is always installed with rlhf_fast
    torch = None

# int64 sums of 2**62 leave room for the doubled values the refinement step compares. The C++ bindings refuse
# larger sums too (csrc/batcher.cpp), but these checks run first, so both paths refuse with one message.
_INT_LIMIT = 2**62
# float64 weights: sums below 2**1000 stay finite through the doubled values the refinement compares.
_FLOAT_LIMIT = 2.0**1000
# Group counts (k, num_ranks, min_micro_batches, ...): the C++ state indexes groups with int32.
MAX_GROUPS = 2**31 - 1


def to_numpy(value):
    """NumPy view of a torch tensor (detached, on CPU; bfloat16 widened to float32, exactly); else the value."""
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return value


def check_positive_int(name: str, value, maximum: int | None = None) -> int:
    """A plain or NumPy integer >= 1 (bool refused), and <= maximum when one is given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {value}")
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
    if array.size and not (_is_integer_dtype(array.dtype) or _holds_python_ints(array)):
        raise TypeError(f"{name}: expected integers, got dtype {array.dtype}")
    # Range checks on the values as given (uint64, or Python ints past int64 in an object array), before the
    # int64 cast: a cast first would wrap 2**63 to a negative number and report it as one.
    if array.size:
        low = int(array.min())
        if low < minimum:
            where = int(np.argmax(array < minimum))
            raise ValueError(f"{name}: expected values >= {minimum}, got {low} at index {where}")
        high = int(array.max())
        if high >= _INT_LIMIT // array.size:
            raise ValueError(f"{name}: expected values whose sum fits in int64, got a maximum of {high}")
    return array.astype(np.int64)


def _is_integer_dtype(dtype) -> bool:
    # timedelta64 counts as an integer subtype in NumPy; it is not a length.
    return dtype != np.bool_ and dtype.kind in "iu"


def _holds_python_ints(array: np.ndarray) -> bool:
    """An object array of integers (NumPy's dtype for Python ints past 64 bits)."""
    return array.dtype == object and all(
        isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in array.tolist()
    )


def check_plain_dtype(name: str, dtype) -> None:
    """A bool, integer or float dtype: what the batcher copies (the C++ copies are raw memcpy; object arrays
    hold pointers that must not be copied without references, so they are refused on both paths)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise TypeError(f"{name}: expected a real or bool dtype, got {dtype}")
    if dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric or bool dtype, got {dtype}")


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
        # Python ints are finite at any size (np.isfinite cannot take one past 64 bits).
        if not (c >= 0 and (isinstance(c, numbers.Integral) or math.isfinite(float(c)))):
            raise ValueError(f"workload: expected finite coefficients >= 0, got {workload!r}")
    a, b = coefficients
    longest = int(lengths.max(initial=0))
    count = max(lengths.size, 1)
    if all(isinstance(c, numbers.Integral) for c in coefficients):
        # Exact Python-int arithmetic: the largest weight times the count bounds every sum the partition forms.
        # Coefficients past the limit are refused even when every length is 0 (NumPy cannot hold them).
        peak = int(a) * longest + int(b) * longest**2
        if peak * count >= _INT_LIMIT or max(int(a), int(b)) >= _INT_LIMIT:
            raise ValueError(f"workload: integer weights {workload!r} overflow int64 here; pass float coefficients")
        return int(a) * lengths + int(b) * lengths * lengths
    # Float weights: the same bound in float64 (an inf or a sum near the float64 maximum would turn the
    # partition's differences into nan on both paths; the C++ path refuses non-finite weights outright).
    peak = float(a) * longest + float(b) * float(longest) ** 2
    if not peak * count < _FLOAT_LIMIT:
        raise ValueError(f"workload: float weights {workload!r} overflow float64 here (sums reach 2**1000)")
    as_float = lengths.astype(np.float64)
    return float(a) * as_float + float(b) * as_float * as_float


def check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
