"""Scalar heads: per-token values and last-token rewards from a sequence-classification style model.

A reward or value model is a ``transformers`` ``*ForSequenceClassification`` model with one label (or any model
with a ``base_model_prefix`` body and a ``score`` / ``v_head`` linear head). Its pooled forward only gives the
last-token logit, so the trainers run the body and the head themselves to get a scalar for every token.
"""
from __future__ import annotations

import torch


def _head(model):
    for name in ("score", "v_head", "value_head", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(model).__name__}: expected a scalar head named score, v_head or value_head "
                     "(use a *ForSequenceClassification model with num_labels=1)")


def scalar_per_token(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` float32 scalar output of the head at every position (a packed row: ``attention_mask=None`` and
    ``position_ids`` restarting in each sequence)."""
    if callable(getattr(model, "get_base_model", None)):  # a PeftModel: its model, with the adapters injected
        model = model.get_base_model()
    body = getattr(model, model.base_model_prefix, None)
    if body is None:
        raise ValueError(f"{type(model).__name__}: no body under base_model_prefix={model.base_model_prefix!r}")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    hidden = body(**inputs).last_hidden_state
    out = _head(model)(hidden)
    if out.shape[-1] != 1:
        raise ValueError(f"{type(model).__name__}: the scalar head has {out.shape[-1]} outputs, expected 1 "
                         "(create the model with num_labels=1)")
    return out.squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each right-padded row."""
    return attention_mask.long().sum(-1) - 1


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 score of each right-padded sequence: the head's output on its last token."""
    values = scalar_per_token(model, input_ids, attention_mask)
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_token_index(attention_mask)]


class PerTokenScalar(torch.nn.Module):
    """Body + scalar head of ``model`` as one module whose forward gives ``[B, T]`` scalars.

    DDP synchronises and FSDP2 gathers parameters around a module's own forward; calling the body and the head
    separately would go around both, so the trainers wrap reward and value models in this.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # a fresh [B, T] tensor, not a view of the head's [B, T, 1] output: FSDP2 hooks its backward on the output
        # and warns about views (an in-place op on one would skip the hook)
        return scalar_per_token(self.model, input_ids, attention_mask, position_ids).clone()


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` entries of ``values[B, T]`` on each right-padded row's last attended token."""
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_token_index(attention_mask)]
