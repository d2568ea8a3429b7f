"""Checks where bad values enter a run: rewards, sequence lengths, and the loss and gradient norm of each step.

One NaN or infinity in a reward or a gradient makes every weight NaN after one optimizer step, and the run
would go on and exit 0. These checks stop it at the source, naming what produced the value; ``on_nonfinite:
skip`` skips a bad optimizer step instead (logged and counted, never a silent update).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

from .errors import NonFiniteError, UserError


def function_name(fn: Callable) -> str:
    """How a reward function is named in errors: its qualified name, or its class for a callable object."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def check_reward_scores(scores, count: int, *, source: str, completions: Optional[Sequence[str]] = None
                        ) -> torch.Tensor:
    """The scores a reward function returned for ``count`` completions, as a float32 CPU tensor.

    ``scores`` must hold ``count`` finite real numbers (a list, a tuple, a NumPy array, a 1-d tensor, or
    one-element tensors); ``source`` names the function in every error (e.g. ``"reward function 'f'"``).
    A wrong type or count raises ``UserError``; a NaN or infinity raises ``NonFiniteError`` naming the row.
    """
    if isinstance(scores, torch.Tensor):
        if scores.dtype == torch.bool or scores.dtype.is_complex or scores.dim() > 1:
            raise UserError(f"{source}: expected one real number per completion, got a tensor of dtype "
                            f"{scores.dtype} and shape {tuple(scores.shape)}")
        values = [float(v) for v in scores.detach().reshape(-1).to("cpu", torch.float64)]
    elif isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__iter__"):
        raise UserError(f"{source}: expected a sequence of {count} numbers (one per completion), got "
                        f"{type(scores).__name__}")
    else:
        values = [_real(value, row, source) for row, value in enumerate(scores)]
    if len(values) != count:
        raise UserError(f"{source}: returned {len(values)} scores for {count} completions (expected one per "
                        "completion, in order)")
    bad = [row for row, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        shown = "" if completions is None else f" (completion {completions[bad[0]]!r})"
        raise NonFiniteError(f"{source}: returned {values[bad[0]]} for completion {bad[0]}{shown}"
                             f"{f' and {len(bad) - 1} more non-finite scores' if len(bad) > 1 else ''}; "
                             "a reward must be a finite number")
    return torch.tensor(values, dtype=torch.float32)


def _real(value, row: int, source: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{source}: score {row} is {value!r} ({type(value).__name__}); expected a real number "
                        "per completion")
    return float(value)


def check_finite_scores(scores: torch.Tensor, *, source: str) -> torch.Tensor:
    """A reward model's scores (one host read): a NaN or infinity raises ``NonFiniteError`` naming the rows."""
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise NonFiniteError(f"{source}: non-finite scores for {len(rows)} of {scores.numel()} responses (rows "
                             f"{rows[:8]}{' ...' if len(rows) > 8 else ''}); check the reward model's weights")
    return scores


def nonfinite_step(grad_norm: torch.Tensor, loss=None) -> Optional[str]:
    """What is not finite in an optimizer step (``"loss nan, grad_norm inf"``), or None. One host read."""
    values = [grad_norm.detach().float().reshape(())]
    if loss is not None:
        values.append(torch.as_tensor(loss, dtype=torch.float32).detach().reshape(()).to(values[0].device))
    read = torch.stack(values).tolist()
    if all(math.isfinite(v) for v in read):
        return None
    named = dict(zip(("grad_norm", "loss"), read))
    return ", ".join(f"{k} {v}" for k, v in named.items())


def check_sequence_length(models: dict, length: int, *, what: str) -> None:
    """Refuse models whose position limit (``config.max_position_embeddings``) is below ``length``, the
    longest sequence the run will build; ``what`` says where that length comes from, naming the fields."""
    for name, model in models.items():
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and length > limit:
            raise UserError(f"{what} is {length} tokens, more than {name}'s max_position_embeddings={limit}; "
                            "lower the configured lengths")
