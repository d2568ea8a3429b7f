"""Variable-length sequences <-> packed ([1, N], flash-attn varlen / HF padding-free) or padded ([B, T]) batches.

Inputs: token ids per sequence (lists, NumPy arrays or torch tensors) and optional per-token fields
(log-probs, values, rewards, masks ...), each a list parallel to the sequences. Outputs are NumPy arrays, so
``torch.from_numpy`` shares their memory. ``indices`` picks which sequences go in the batch and in what order
(e.g. one micro-batch of a plan); ``unpack`` / ``unpad`` return per-sequence results in that same order, and
``restore_order`` puts the results of several batches back into the original sequence order.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from . import _backend
from ._checks import MAX_GROUPS, check_option, check_plain_dtype, check_positive_int, to_numpy


@dataclass
class PackedBatch:
    """Sequences laid end to end in one row.

    ``input_ids[1, N]`` int64; ``position_ids[1, N]`` int64 restarting at 0 for each sequence; ``cu_seqlens``
    int32 ``[n + 1]`` (sequence boundaries, as flash-attn varlen takes them); ``max_seqlen``; ``seq_lens[n]``;
    ``indices[n]`` (which input sequence each packed sequence is); ``fields[name][1, N]`` per-token extras.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int
    seq_lens: np.ndarray
    indices: np.ndarray
    num_sequences: int
    fields: dict = field(default_factory=dict)

    def to_torch(self, device=None) -> dict:
        """Model inputs as torch tensors: HF padding-free keys (``cu_seq_lens_q/k``, ``max_length_q/k``) plus
        ``cu_seqlens`` / ``max_seqlen`` for flash-attn and every field. CPU tensors share the NumPy memory."""
        import torch

        out = {"input_ids": self.input_ids, "position_ids": self.position_ids, "cu_seqlens": self.cu_seqlens,
               "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens, **self.fields}
        out = {k: torch.from_numpy(v).to(device) if device is not None else torch.from_numpy(v)
               for k, v in out.items()}
        out.update(max_seqlen=self.max_seqlen, max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
        return out


@dataclass
class PaddedBatch:
    """Sequences as rows of a ``[B, T]`` batch.

    ``input_ids[B, T]`` int64 (pad positions hold ``pad_value``); ``attention_mask[B, T]`` int64 (1 = token);
    ``position_ids[B, T]`` int64 (0.. over the tokens, 0 on padding); ``seq_lens[B]``; ``indices[B]``;
    ``padding_side``; ``fields[name][B, T]``.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    seq_lens: np.ndarray
    indices: np.ndarray
    num_sequences: int
    padding_side: str
    fields: dict = field(default_factory=dict)

    def to_torch(self, device=None) -> dict:
        """``input_ids``, ``attention_mask``, ``position_ids`` and every field as torch tensors."""
        import torch

        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
               "position_ids": self.position_ids, **self.fields}
        return {k: torch.from_numpy(v).to(device) if device is not None else torch.from_numpy(v)
                for k, v in out.items()}


def pack(sequences, *, indices=None, fields=None, backend=None) -> PackedBatch:
    """Pack ``sequences`` (or those at ``indices``, in that order) into one row with ``cu_seqlens``.

    Args:
        sequences: token ids, one 1-D integer sequence (>= 1 token) per sequence.
        indices: which sequences, in which order (default: all, in order); e.g. ``plan[rank][micro_batch]``.
        fields: ``{name: per-sequence arrays}``, each array as long as its sequence (any numeric or bool
            dtype; a field's arrays are promoted to one common dtype).
        backend: ``None`` (C++ when built), ``"cpp"`` or ``"python"``; both give identical arrays.
    """
    selected, seq_lens, picked = _select(sequences, indices)
    ids = [_token_ids(sequences, i) for i in picked]
    extras = {name: _field(name, values, picked, seq_lens, len(sequences)) for name, values in _fields(fields)}
    native = _backend.choose(backend)
    input_ids = _concat(native, ids, np.int64)
    positions = (native.batcher_packed_positions(seq_lens) if native is not None
                 else _packed_positions(seq_lens))
    cu_seqlens = np.zeros(len(picked) + 1, dtype=np.int32)
    np.cumsum(seq_lens, out=cu_seqlens[1:])
    return PackedBatch(
        input_ids=input_ids.reshape(1, -1),
        position_ids=positions.reshape(1, -1),
        cu_seqlens=cu_seqlens,
        max_seqlen=int(seq_lens.max(initial=0)),
        seq_lens=seq_lens,
        indices=selected,
        num_sequences=len(sequences),
        fields={name: _concat(native, arrays, dtype).reshape(1, -1) for name, (arrays, dtype, _) in extras.items()},
    )


def pad(sequences, *, indices=None, fields=None, padding_side="right", pad_value=0, field_pad_values=None,
        pad_to_multiple_of=None, backend=None) -> PaddedBatch:
    """Pad ``sequences`` (or those at ``indices``, in that order) into ``[B, T]`` rows with an attention mask.

    Args:
        padding_side: ``"right"`` (tokens first; training) or ``"left"`` (tokens last; generation).
        pad_value: the token id written on padding.
        field_pad_values: ``{name: value}`` for the padding of each field (default 0 / False).
        pad_to_multiple_of: round T up to a multiple of this (e.g. 8 for tensor cores).
        Other arguments as in ``pack``.
    """
    check_option("padding_side", padding_side, ("right", "left"))
    if pad_to_multiple_of is not None:
        pad_to_multiple_of = check_positive_int("pad_to_multiple_of", pad_to_multiple_of, MAX_GROUPS)
    selected, seq_lens, picked = _select(sequences, indices)
    ids = [_token_ids(sequences, i) for i in picked]
    extras = {name: _field(name, values, picked, seq_lens, len(sequences)) for name, values in _fields(fields)}
    field_pad_values = {} if field_pad_values is None else dict(field_pad_values)
    unknown = sorted(set(field_pad_values) - set(extras))
    if unknown:
        raise ValueError(f"field_pad_values: expected names among fields {sorted(extras)}, got {unknown}")
    width = int(seq_lens.max(initial=0))
    if pad_to_multiple_of is not None:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    left = padding_side == "left"
    native = _backend.choose(backend)
    input_ids = _pad_rows(native, ids, np.int64, width, _pad_scalar("pad_value", pad_value, np.int64), left)
    if native is not None:
        mask, positions = native.batcher_padded_layout(seq_lens, width, left)
    else:
        mask, positions = _padded_layout(seq_lens, width, left)
    padded_fields = {}
    for name, (arrays, dtype, _) in extras.items():
        fill = _pad_scalar(f"field_pad_values[{name!r}]", field_pad_values.get(name, 0), dtype)
        padded_fields[name] = _pad_rows(native, arrays, dtype, width, fill, left)
    return PaddedBatch(input_ids, mask, positions, seq_lens, selected, len(sequences), padding_side, padded_fields)


def unpack(values, batch: PackedBatch) -> list:
    """Per-token outputs ``[1, N, *]`` (or ``[N, *]``) of a packed batch -> one ``[L_i, *]`` slice per sequence,
    in the batch's order. NumPy arrays and torch tensors (any device) both work; the slices are views."""
    total = int(batch.cu_seqlens[-1])
    shape = tuple(values.shape)
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == total:
        values = values[0]
    elif not (len(shape) >= 1 and shape[0] == total):
        raise ValueError(f"values: expected shape [1, {total}, *] or [{total}, *] (the packed tokens), got {shape}")
    bounds = batch.cu_seqlens.tolist()
    return [values[bounds[j] : bounds[j + 1]] for j in range(len(bounds) - 1)]


def unpad(values, batch: PaddedBatch) -> list:
    """Per-token outputs ``[B, T, *]`` of a padded batch -> one ``[L_i, *]`` slice per sequence (padding
    dropped), in the batch's order. NumPy arrays and torch tensors both work; the slices are views."""
    rows, width = batch.input_ids.shape
    shape = tuple(values.shape)
    if len(shape) < 2 or shape[:2] != (rows, width):
        raise ValueError(f"values: expected shape [{rows}, {width}, *] (the padded batch), got {shape}")
    out = []
    for row, length in enumerate(batch.seq_lens.tolist()):
        start = width - length if batch.padding_side == "left" else 0
        out.append(values[row, start : start + length])
    return out


def restore_order(outputs, batches) -> list:
    """Per-sequence results of several batches (``unpack`` / ``unpad`` lists, one per batch) -> one list in the
    original sequence order; sequences that were in no batch get ``None``. A sequence in two batches is an error."""
    outputs, batches = list(outputs), list(batches)
    if len(outputs) != len(batches):
        raise ValueError(f"outputs: expected one list per batch ({len(batches)}), got {len(outputs)}")
    total = max((b.num_sequences for b in batches), default=0)
    result = [None] * total
    seen = np.zeros(total, dtype=bool)
    for b, (out, batch) in enumerate(zip(outputs, batches)):
        if len(out) != len(batch.indices):
            raise ValueError(f"outputs[{b}]: expected {len(batch.indices)} sequences (batch {b}), got {len(out)}")
        for value, index in zip(out, batch.indices.tolist()):
            if seen[index]:
                raise ValueError(f"batches: expected each sequence in one batch, got sequence {index} twice")
            seen[index] = True
            result[index] = value
    return result


# ----------------------------------------------------------------------------------------------- helpers


def _select(sequences, indices):
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
        raise TypeError(f"sequences: expected a list of token-id sequences, got {type(sequences).__name__}")
    count = len(sequences)
    if indices is None:
        selected = np.arange(count, dtype=np.int64)
    else:
        raw = to_numpy(indices)
        selected = np.asarray(raw)
        if selected.ndim != 1:
            raise ValueError(f"indices: expected a 1-D list of integers, got shape {selected.shape}")
        if selected.size and (selected.dtype == np.bool_ or not np.issubdtype(selected.dtype, np.integer)):
            raise TypeError(f"indices: expected integers, got dtype {selected.dtype}")
        selected = selected.astype(np.int64)
        if selected.size and (selected.min() < 0 or selected.max() >= count):
            bad = int(selected.min()) if selected.min() < 0 else int(selected.max())
            raise ValueError(f"indices: expected values in [0, {count - 1}] (the sequences), got {bad}")
        if np.unique(selected).size != selected.size:
            raise ValueError(f"indices: expected distinct values, got {selected.tolist()}")
    picked = selected.tolist()
    seq_lens = np.array([_length(sequences, i) for i in picked], dtype=np.int64)
    return selected, seq_lens, picked


def _length(sequences, i) -> int:
    seq = sequences[i]
    shape = getattr(seq, "shape", None)
    if shape is not None:
        if len(shape) != 1:
            raise ValueError(f"sequences[{i}]: expected a 1-D sequence of token ids, got shape {tuple(shape)}")
        length = int(shape[0])
    elif isinstance(seq, (list, tuple)):
        length = len(seq)
    else:
        raise TypeError(f"sequences[{i}]: expected a list, array or tensor of token ids, got {type(seq).__name__}")
    if length < 1:
        raise ValueError(f"sequences[{i}]: expected at least 1 token, got an empty sequence")
    return length


def _token_ids(sequences, i) -> np.ndarray:
    array = np.asarray(to_numpy(sequences[i]))
    if array.dtype.kind not in "iu":  # not bool, not timedelta64 (an integer subtype in NumPy), not object
        raise TypeError(f"sequences[{i}]: expected integer token ids, got dtype {array.dtype}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        # The int64 cast below would wrap the id to a negative one.
        where = int(np.argmax(array > np.iinfo(np.int64).max))
        raise ValueError(f"sequences[{i}]: expected token ids that fit in int64, got {int(array[where])} at "
                         f"position {where}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _fields(fields):
    if fields is None:
        return []
    if not isinstance(fields, dict):
        raise TypeError(f"fields: expected a dict of name -> per-sequence arrays, got {type(fields).__name__}")
    for name in fields:
        if not isinstance(name, str):
            raise TypeError(f"fields: expected string names, got {name!r}")
        if name in ("input_ids", "position_ids", "attention_mask", "cu_seqlens"):
            raise ValueError(f"fields: expected names other than the batch's own arrays, got {name!r}")
    return list(fields.items())


def _field(name, values, picked, seq_lens, count):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != count:
        got = len(values) if hasattr(values, "__len__") else type(values).__name__
        raise ValueError(f"fields[{name!r}]: expected one array per sequence ({count}), got {got}")
    arrays = []
    for i, length in zip(picked, seq_lens.tolist()):
        array = np.asarray(to_numpy(values[i]))
        if array.ndim != 1 or array.shape[0] != length:
            raise ValueError(
                f"fields[{name!r}][{i}]: expected shape ({length},) (the length of sequences[{i}]), "
                f"got {array.shape}"
            )
        # Object (pointers), string, datetime / timedelta and struct arrays are refused on both paths.
        check_plain_dtype(f"fields[{name!r}][{i}]", array.dtype)
        arrays.append(array)
    dtype = np.result_type(*arrays) if arrays else np.dtype(np.float32)
    return [np.ascontiguousarray(a, dtype=dtype) for a in arrays], dtype, name


def _pad_scalar(name, value, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if isinstance(value, (bool, np.bool_)) and dtype != np.bool_:
        raise TypeError(f"{name}: expected a number for dtype {dtype}, got {value!r}")
    if not isinstance(value, (numbers.Number, np.generic)) or isinstance(value, complex):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    integral = dtype == np.bool_ or np.issubdtype(dtype, np.integer)
    if integral and not float(value).is_integer():
        raise TypeError(f"{name}: expected an integer for dtype {dtype}, got {value!r}")
    if integral:
        info = (0, 1) if dtype == np.bool_ else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if not info[0] <= int(value) <= info[1]:
            raise ValueError(f"{name}: expected a value in [{info[0]}, {info[1]}] (dtype {dtype}), got {value!r}")
    return np.array(value, dtype=dtype)


def _concat(native, arrays, dtype) -> np.ndarray:
    check_plain_dtype("dtype", dtype)  # the callers pass checked dtypes; the C++ copies are raw memcpy
    if native is not None:
        return native.batcher_concat(arrays, np.dtype(dtype))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _pad_rows(native, arrays, dtype, width, fill, left) -> np.ndarray:
    check_plain_dtype("dtype", dtype)
    if native is not None:
        return native.batcher_pad_rows(arrays, np.dtype(dtype), width, fill, left)
    out = np.full((len(arrays), width), fill, dtype=dtype)
    for row, array in enumerate(arrays):
        if left:
            out[row, width - array.shape[0] :] = array
        else:
            out[row, : array.shape[0]] = array
    return out


def _packed_positions(seq_lens: np.ndarray) -> np.ndarray:
    total = int(seq_lens.sum())
    starts = np.cumsum(seq_lens) - seq_lens
    return np.arange(total, dtype=np.int64) - np.repeat(starts, seq_lens)


def _padded_layout(seq_lens: np.ndarray, width: int, left: bool):
    columns = np.arange(width, dtype=np.int64)[None, :]
    lens = seq_lens[:, None]
    if left:
        mask = columns >= width - lens
        positions = np.where(mask, columns - (width - lens), 0)
    else:
        mask = columns < lens
        positions = np.where(mask, columns, 0)
    return mask.astype(np.int64), positions.astype(np.int64)
