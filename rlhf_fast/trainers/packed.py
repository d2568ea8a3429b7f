"""Micro-batches in either layout, and the trainers' choice between them.

A ``MicroBatch`` holds the sequences of one forward pass either **packed** (``input_ids[1, N]`` from
``rlhf_fast.batching.pack``, ``position_ids`` restarting in each sequence, ``cu_seqlens``; no padding) or
**padded** (``input_ids[b, t]`` right-padded to the longest row, with an attention mask). Both layouts give every
position a next-token label (``labels``, the shape of ``input_ids``): the label of a sequence's last token is
arbitrary and always masked. So per-position model outputs (log-probs of ``labels``, values, scalar head outputs)
have the shape of ``input_ids`` in both layouts, and the trainers move per-token data between a micro-batch and
the ``[B, W]`` rows of a whole batch (``W`` label positions per row: position ``t`` predicts token ``t + 1``) with
``take`` and ``to_rows``.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch

from .. import batching
from .data import pad_right

_logger = logging.getLogger(__name__)
_logged: set = set()


class MicroBatch:
    """Sequences ``rows`` of ``sequences`` as one forward pass's inputs (see the module docstring)."""

    def __init__(self, sequences, rows: list[int], *, packed: bool, pad_id: int, device):
        self.rows = list(rows)
        self.lengths = [len(sequences[i]) for i in self.rows]
        self.packed = packed
        self.device = device
        if packed:
            batch = batching.pack(sequences, indices=self.rows)
            ids = torch.from_numpy(batch.input_ids)
            self.cu_seqlens = batch.cu_seqlens.astype(np.int64)  # a host array: the ops read it without a sync
            self.max_seqlen = batch.max_seqlen
            self.input_ids = ids.to(device)
            self.position_ids = torch.from_numpy(batch.position_ids).to(device)
            self.attention_mask = None
            self.labels = torch.roll(ids, -1, dims=1).to(device)  # next token; across a boundary: masked
            row = np.repeat(np.arange(len(self.rows)), self.lengths)
            self._row = torch.from_numpy(row)  # the sequence of each position
            self._time = torch.from_numpy(batch.position_ids.reshape(-1).copy())  # its index in the sequence
        else:
            ids, attention = pad_right([sequences[i] for i in self.rows], pad_id)
            self.cu_seqlens = None
            self.max_seqlen = ids.shape[1]
            self.input_ids = ids.to(device)
            self.position_ids = None
            self.attention_mask = attention.to(device)
            self.labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad_id)], dim=1).to(device)
            width = ids.shape[1]
            self._row = torch.arange(len(self.rows)).repeat_interleave(width)
            self._time = torch.arange(width).repeat(len(self.rows))
        # positions with a label inside their own sequence (all but each sequence's last token)
        self._labelled = self._time < torch.tensor(self.lengths, dtype=torch.long)[self._row] - 1
        self._device_index = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def model_inputs(self) -> dict:
        """Keyword arguments of a ``transformers`` forward: ``input_ids`` with ``position_ids`` (packed) or
        ``attention_mask`` (padded)."""
        if self.packed:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def _index(self):
        if self._device_index is None:
            self._device_index = tuple(t.to(self.device) for t in (self._row, self._time, self._labelled))
        return self._device_index

    def take(self, table: torch.Tensor, rows: Optional[list[int]] = None) -> torch.Tensor:
        """Per-position values of this micro-batch from ``table[R, W]`` (label positions of whole rows; row
        ``rows[i]`` is this micro-batch's sequence ``i``, default ``self.rows``): the shape of ``input_ids``, 0 on
        each sequence's last token and on padding."""
        row, time, labelled = self._index()
        rows = self.rows if rows is None else rows
        source = torch.as_tensor(rows, device=table.device)[row.to(table.device)]
        width = table.shape[1]
        if width == 0:
            return torch.zeros(self.shape, dtype=table.dtype, device=table.device)
        values = table[source, time.to(table.device).clamp(max=width - 1)]
        values = torch.where(labelled.to(table.device) & (time.to(table.device) < width), values,
                             torch.zeros((), dtype=table.dtype, device=table.device))
        return values.reshape(self.shape)

    def to_rows(self, values: torch.Tensor, width: int) -> torch.Tensor:
        """``[b, width]`` rows (this micro-batch's sequences, in order) of per-position ``values`` (the shape of
        ``input_ids``): the label positions of each sequence, 0 beyond them."""
        row, time, labelled = self._index()
        flat = values.reshape(-1)
        out = torch.zeros((len(self.rows), width), dtype=values.dtype, device=values.device)
        keep = labelled & (time < width)
        out[row[keep], time[keep]] = flat[keep]
        return out

    def last_token(self, values: torch.Tensor) -> torch.Tensor:
        """``[b]`` entries of per-position ``values`` on each sequence's last token."""
        lengths = torch.tensor(self.lengths, device=values.device)
        if self.packed:
            return values.reshape(-1)[torch.as_tensor(self.cu_seqlens[1:] - 1, device=values.device)]
        return values[torch.arange(len(self.rows), device=values.device), lengths - 1]


@torch.no_grad()
def per_token_in_micro_batches(fn: Callable[[MicroBatch], torch.Tensor], sequences, micro_batches, *,
                               packed: bool, pad_id: int, device, per_sequence: bool = False, outputs: int = 1):
    """``fn(micro_batch)`` over ``micro_batches`` (lists of indices into ``sequences``).

    ``fn`` returns per-position results (the shape of the micro-batch's ``input_ids``; ``[b]`` with
    ``per_sequence=True``), or a tuple of ``outputs`` of them. The output is ``[B, T_max - 1]`` float32 (label
    positions; 0 beyond each row's length and in rows of no micro-batch), ``[B]`` with ``per_sequence``, or a
    tuple. An empty micro-batch still calls ``fn`` once, on the first sequence, and drops the result: under FSDP2
    every rank must run the same number of forwards."""
    width = max(len(s) for s in sequences) - 1
    shape = (len(sequences),) if per_sequence else (len(sequences), width)
    outs = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(outputs)]
    for micro in micro_batches:
        batch = MicroBatch(sequences, micro or [0], packed=packed, pad_id=pad_id, device=device)
        results = fn(batch)
        if not micro:
            continue
        if outputs == 1:
            results = (results,)
        elif not isinstance(results, (tuple, list)) or len(results) != outputs:
            raise ValueError(f"per_token_in_micro_batches: fn must return {outputs} tensors with outputs={outputs}")
        index = torch.tensor(micro, device=device)
        for out, result in zip(outs, results):
            out[index] = result.float() if per_sequence else batch.to_rows(result.float(), width)
    return outs[0] if outputs == 1 else tuple(outs)


def choose_packing(setting, models: dict) -> bool:
    """Whether the trainer runs packed micro-batches: ``padding_free`` (``"auto"``, True or False) and the
    models that will run them (``{role: model}``; functions and ``None`` are skipped).

    ``True`` refuses a model whose attention cannot be packed (``ValueError`` naming the role and the reason);
    ``"auto"`` falls back to padded batches for all models then, with one log line. When packing, each model is
    switched to the packed attention (``rlhf_fast.packed_attention``)."""
    if setting is False:
        return False
    from ..packed_attention import enable_packed_attention, packing_unsupported_reason

    modules = {role: m for role, m in models.items() if isinstance(m, torch.nn.Module)}
    for role, model in modules.items():
        reason = packing_unsupported_reason(model)
        if reason is None:
            continue
        message = f"padding_free: {role} ({type(model).__name__}) cannot run on packed rows: {reason}"
        if setting is True:
            raise ValueError(message + "; set padding_free: false or auto")
        if message not in _logged:
            _logged.add(message)
            _logger.warning("%s; running padded batches (padding_free: auto)", message)
        return False
    for model in modules.values():
        enable_packed_attention(model)
    return True


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of every decoder layer (``transformers``' own, non-reentrant: it composes with
    packed attention, DDP and FSDP2); a model without support gets a ``ValueError`` naming it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing "
                         "(transformers' activation checkpointing)")
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def token_logprobs(model, batch: MicroBatch, *, temperature: float, from_hidden: bool = False) -> torch.Tensor:
    """log p(``batch.labels``) at every position under ``model`` at ``temperature`` (the shape of ``input_ids``).

    ``from_hidden``: fused lm_head + log-softmax, never building the logits; ``model`` is then a ``FusedLinearLM``
    (bare, or inside DDP / FSDP2: called through its forward) or a bare causal LM (one process only)."""
    from .. import ops

    if from_hidden:
        from ..modeling import FusedLinearLM, sequence_logprobs
        from .distributed import unwrap

        kwargs = dict(temperature=temperature, position_ids=batch.position_ids, labels=batch.labels)
        if isinstance(unwrap(model), FusedLinearLM):
            return model(batch.input_ids, batch.attention_mask, **kwargs)
        return sequence_logprobs(model, batch.input_ids, batch.attention_mask, **kwargs)
    logits = model(**batch.model_inputs()).logits
    return ops.selective_log_softmax(logits, batch.labels, temperature=temperature)
