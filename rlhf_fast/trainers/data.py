"""JSONL datasets, their schemas, tokenisation and padding.

Schemas (one JSON object per line; extra fields are kept and ignored):
- SFT:    ``{"prompt": str, "completion": str}``
- Reward: ``{"prompt": str, "chosen": str, "rejected": str}`` (optional ``"margin": float``)
- PPO:    ``{"prompt": str}``
A dataset is any sized, indexable sequence of such dicts: a list, or a Hugging Face ``datasets.Dataset``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import torch

SCHEMAS = {
    "sft": ("prompt", "completion"),
    "rm": ("prompt", "chosen", "rejected"),
    "ppo": ("prompt",),
}


def load_jsonl(path: str, kind: str) -> list[dict[str, Any]]:
    """Read and validate a JSONL file of schema ``kind`` ("sft", "rm", "ppo"); errors name file and line."""
    if kind not in SCHEMAS:
        raise ValueError(f"kind: expected one of {list(SCHEMAS)}, got {kind!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    with open(path, "rb") as handle:  # bytes, decoded line by line: a decoding error then has a line number
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte {raw[error.start]:#04x} at byte "
                                 f"{error.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
            records.append(check_record(record, kind, where=f"{path}:{number}"))
    if not records:
        raise ValueError(f"{path}: no records (expected one JSON object per line with {list(SCHEMAS[kind])})")
    return records


def check_record(record: Any, kind: str, *, where: str) -> dict[str, Any]:
    fields = SCHEMAS[kind]
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {list(fields)}, got {type(record).__name__}")
    for name in fields:
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (the {kind} schema needs {list(fields)})")
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
        try:  # a "\ud800" escape parses to a lone surrogate, which no tokenizer can encode
            record[name].encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{where}: field {name!r} holds a lone surrogate ({record[name][error.start]!r} at "
                             f"character {error.start}), which is not text") from None
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
    if not math.isfinite(margin):  # Python's JSON reads NaN and Infinity; one NaN margin makes every weight NaN
        raise ValueError(f"{where}: field 'margin' must be a finite number, got {margin}")
    return record


def check_dataset(dataset: Sequence[dict], kind: str, name: str) -> Sequence[dict]:
    if dataset is None:
        raise ValueError(f"{name}: a dataset is required")
    if len(dataset) == 0:
        raise ValueError(f"{name}: the dataset is empty")
    for index, record in enumerate(dataset):  # every row: a bad one late in the data would stop a long run
        check_record(record, kind, where=f"{name}[{index}]")
    return dataset


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids: BOS (when the tokenizer has one) + the text, no other special tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def truncate_left(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """The last ``max_length`` tokens of ``ids``, keeping a leading BOS: ``[BOS] + ids[-(max_length - 1):]``."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and max_length > 1:
        return [bos_id] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:] if max_length > 0 else []


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion ids followed by EOS, so that the model learns to stop."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids[B, T]`` and ``attention_mask[B, T]``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("processing_class: the tokenizer has neither a pad nor an EOS token")
