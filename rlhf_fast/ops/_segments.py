"""``cu_seqlens``: sequence boundaries inside a packed row, for the ops whose math is per sequence.

A packed row holds sequences back to back: ``cu_seqlens = [0, L_0, L_0 + L_1, ..., N]`` (``rlhf_fast.batching.pack``).
The per-sequence aggregation modes (``seq-mean-*``) need the boundaries; the ops then lay the packed per-token
scalars out as one row per sequence (``[S, max L]``, a gather of ``N`` floats, never of logits or hidden states)
and aggregate those rows exactly as they would aggregate the padded batch.
"""
from __future__ import annotations

import numpy as np
import torch

SEQUENCE_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_cu_seqlens(cu_seqlens, shape, ref_name: str) -> list[int] | None:
    """Validate ``cu_seqlens`` against a packed per-token tensor of ``shape`` (``[N]`` or ``[1, N]``); returns
    the boundaries as a host list (a device tensor is read once, here)."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seqlens: expected integer boundaries, got dtype {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor [S + 1], got shape {tuple(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
    else:
        array = np.asarray(cu_seqlens)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise TypeError(f"cu_seqlens: expected a 1-D sequence of integers, got {type(cu_seqlens).__name__} "
                            f"of dtype {array.dtype} and shape {array.shape}")
        bounds = array.tolist()
    shape = tuple(shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)):
        raise ValueError(f"cu_seqlens: given for {ref_name} of shape {shape}; expected a packed row [N] or [1, N]")
    total = shape[-1]
    if len(bounds) < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 entries [0, ..., {total}], got {bounds}")
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {bounds[0]}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens: expected to end at {total} (the tokens of {ref_name}, shape {shape}), "
                         f"got {bounds[-1]}")
    steps = np.diff(np.asarray(bounds, dtype=np.int64))
    if (steps <= 0).any():
        at = int(np.argmax(steps <= 0))
        raise ValueError(f"cu_seqlens: expected strictly increasing boundaries (every sequence >= 1 token), got "
                         f"{bounds[at]} then {bounds[at + 1]} at entries {at}, {at + 1}")
    return bounds


class SegmentRows:
    """Gather of a packed row ``[N]`` into one row per sequence ``[S, max L]`` (zeros after each sequence)."""

    def __init__(self, bounds: list[int], device):
        starts = torch.tensor(bounds[:-1], dtype=torch.long)
        lengths = torch.tensor(bounds[1:], dtype=torch.long) - starts
        self.width = int(lengths.max())
        columns = torch.arange(self.width)
        self.valid = (columns[None, :] < lengths[:, None]).to(device)
        self.index = (starts[:, None] + columns[None, :]).clamp(max=bounds[-1] - 1).to(device)

    def __call__(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        rows = t.reshape(-1)[self.index]
        return torch.where(self.valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
