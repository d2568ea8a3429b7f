"""Argument checks shared by the public ops.

Every failure names the argument, what was expected and what was received, so a user never has to read a
kernel to learn why a call was refused. Checks that need a device sync are limited to the label range and the
values of a non-bool mask.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.int32)
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32
FLOAT32_MAX = torch.finfo(torch.float32).max


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    check_tensor(name, value)
    if value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {_names(dtypes)}, got {value.dtype}")
    return value


def check_labels(name: str, labels, vocab_size: int) -> torch.Tensor:
    check_tensor(name, labels)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name}: expected dtype in {_names(LABEL_DTYPES)}, got {labels.dtype}")
    if labels.numel():
        # One reduction and one device-to-host copy (a single sync): the kernels index rows by label, so an
        # out-of-range label would read out of bounds.
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: expected values in [0, {vocab_size - 1}] (the vocabulary), got {bad}")
    return labels


def check_mask(name: str, mask) -> torch.Tensor:
    check_tensor(name, mask)
    if mask.dtype.is_complex:
        raise TypeError(f"{name}: expected a bool, integer or floating 0/1 tensor, got {mask.dtype}")
    if mask.dtype != torch.bool and mask.numel():
        # One reduction and one device-to-host copy (a single sync; a bool mask needs none): the ops read any
        # non-zero as 1, so a 0.5 or a 2 meant as a weight would silently count as 1.
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            where = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(f"{name}: expected only 0 and 1 (a mask, not a weight), got {mask[where].item()} at "
                             f"index {where}")
    return mask


def check_ndim(name: str, value: torch.Tensor, allowed: Iterable[int], what: str) -> None:
    allowed = tuple(allowed)
    if value.dim() not in allowed:
        raise ValueError(f"{name}: expected {what}, got shape {tuple(value.shape)}")


def check_min_ndim(name: str, value: torch.Tensor, minimum: int, what: str) -> None:
    if value.dim() < minimum:
        raise ValueError(f"{name}: expected {what}, got shape {tuple(value.shape)}")


def check_shape(name: str, value: torch.Tensor, shape: Sequence[int], ref_name: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (the shape of {ref_name}), got {tuple(value.shape)}"
        )


def check_same_device(named: dict) -> None:
    tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
    devices = {k: v.device for k, v in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


def check_option(name: str, value, allowed: Sequence) -> None:
    """``value`` must be one of ``allowed``; a misspelt string gets a did-you-mean hint."""
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}{did_you_mean(value, allowed)}")


def did_you_mean(value, choices: Iterable) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a string ``value``, else ``''``."""
    import difflib

    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_number(
    name: str,
    value,
    *,
    greater_than: Optional[float] = None,
    at_least: Optional[float] = None,
    at_most: Optional[float] = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if greater_than is not None and not value > greater_than:
        raise ValueError(f"{name}: expected a value > {greater_than}, got {value}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name}: expected a value >= {at_least}, got {value}")
    if at_most is not None and not value <= at_most:
        raise ValueError(f"{name}: expected a value <= {at_most}, got {value}")
    return value


def check_count(name: str, value) -> Optional[float]:
    """num_tokens / num_seqs / loss_scale overrides: None, or a positive finite number or one-element tensor.

    Returns the value as a Python float (None stays None), for the ops to pass on. A tensor is read here, once
    (a device sync): overrides come from an all-reduce, and a zero or nan there would otherwise turn into a
    silently wrong loss; the float spares the kernels a second read.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name}: expected a real-valued tensor, got {value.dtype}")
        value = value.item()
    value = check_number(name, value, greater_than=0)
    # The kernels divide in float32: a count that rounds to 0 or inf there would be a silently wrong loss.
    if not FLOAT32_TINY <= value <= FLOAT32_MAX:
        raise ValueError(f"{name}: expected a value representable in float32 [{FLOAT32_TINY:.3g}, "
                         f"{FLOAT32_MAX:.3g}], got {value}")
    return value


def _names(dtypes) -> str:
    return "(" + ", ".join(str(d).replace("torch.", "") for d in dtypes) + ")"
