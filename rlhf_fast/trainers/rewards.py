"""Reward functions next to reward models, with TRL's calling convention.

``reward_model`` of ``PPOTrainer`` is a model, a Python function, or a list mixing them; ``reward_weights`` (one
per entry, default 1) weight them. Each function is called once per batch with keyword arguments::

    f(prompts=[str], completions=[str], completion_ids=[[int]], **columns) -> one float (or None) per completion

where ``columns`` are the dataset's other fields (``{"prompt": ..., "answer": ...}`` gives ``answer=[...]``).
A function without ``**kwargs`` gets only the arguments it names. ``None`` means "no score from this function
for this completion" (a math checker asked about a code prompt): the weighted sum skips it, as TRL's ``nansum``
does; a completion that no function scores is an error. Anything else that is not a finite number (NaN, inf,
a string, a wrong count, an exception) is an error naming the function and the row.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import NonFiniteError, UserError

RESERVED = ("prompts", "completions", "completion_ids")


class RewardFunctionError(UserError):
    """A reward function raised or returned something that is not one finite number (or None) per completion."""


class NonFiniteRewardError(NonFiniteError, RewardFunctionError):
    """A reward function returned NaN or an infinity (the CLI's non-finite exit status)."""


def function_name(func) -> str:
    """What the logs call a reward: a function's ``__name__`` (through ``functools.partial``), a model's name."""
    if isinstance(func, torch.nn.Module):
        path = getattr(getattr(func, "config", None), "_name_or_path", "") or ""
        return os.path.basename(str(path).rstrip("/")) or type(func).__name__
    inner = getattr(func, "func", func)  # functools.partial
    return getattr(inner, "__name__", None) or type(inner).__name__


class RewardFunctions:
    """The reward models and functions of one trainer, their names, weights and per-function scores.

    ``self.models`` lists ``(column, model)`` for the entries that are ``torch.nn.Module``: the trainer scores
    those itself (on token ids, in micro-batches); ``score_functions`` fills the other columns.
    """

    def __init__(self, reward_model, weights: Optional[Sequence[float]] = None):
        entries = list(reward_model) if isinstance(reward_model, (list, tuple)) else [reward_model]
        if not entries:
            raise ValueError("reward_model: expected a model, a function or a non-empty list of them, got []")
        for i, entry in enumerate(entries):
            if entry is None or not (isinstance(entry, torch.nn.Module) or callable(entry)):
                where = f"reward_model[{i}]" if isinstance(reward_model, (list, tuple)) else "reward_model"
                raise TypeError(f"{where}: expected a model or a callable, got {type(entry).__name__}")
        self.entries = entries
        self.names = _unique([function_name(e) for e in entries])
        self.models = [(i, e) for i, e in enumerate(entries) if isinstance(e, torch.nn.Module)]
        if weights is None:
            weights = [1.0] * len(entries)
        weights = list(weights)
        if len(weights) != len(entries):
            raise ValueError(f"reward_weights: expected one weight per reward ({len(entries)}: "
                             f"{', '.join(self.names)}), got {len(weights)}")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"reward_weights[{i}]: expected a finite number, got {w!r}")
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.entries)

    def score_functions(self, out: torch.Tensor, rows: list[int], prompts: list, completions: list,
                        completion_ids: list, columns: dict[str, list]) -> None:
        """Write each function's scores of ``rows`` into ``out[row, column]`` (NaN for ``None``)."""
        if not rows:
            return
        kwargs = {"prompts": [prompts[i] for i in rows], "completions": [completions[i] for i in rows],
                  "completion_ids": [completion_ids[i] for i in rows]}
        kwargs.update({k: [values[i] for i in rows] for k, values in columns.items()})
        index = torch.tensor(rows, dtype=torch.long)
        for column, func in enumerate(self.entries):
            if isinstance(func, torch.nn.Module):
                continue
            name = self.names[column]
            try:
                returned = _call(func, name, kwargs)
            except RewardFunctionError:
                raise
            except Exception as error:  # noqa: BLE001 - re-raised with the function and the rows named
                raise RewardFunctionError(
                    f"reward function {name!r} raised {type(error).__name__}: {error} (on rows {_span(rows)}, "
                    f"first prompt {kwargs['prompts'][0]!r})") from error
            out[index, column] = _check_scores(name, returned, rows)

    def combine(self, per_function: torch.Tensor) -> torch.Tensor:
        """``[B]`` weighted sum over the functions of ``per_function[B, F]``, skipping NaN (``None``)."""
        scored = ~torch.isnan(per_function)
        missing = (~scored.any(-1)).nonzero().flatten().tolist()
        if missing:
            raise RewardFunctionError(
                f"reward functions {', '.join(map(repr, self.names))} all returned None for row {missing[0]} "
                f"({len(missing)} such rows): every completion needs a score from at least one function")
        weights = self.weights.to(per_function.device)
        return torch.where(scored, per_function * weights, 0.0).sum(-1)

    def metrics(self, per_function: torch.Tensor) -> dict[str, float]:
        """``rewards/{name}/mean`` and ``/std`` over the completions each function scored (TRL's names)."""
        out = {}
        for column, name in enumerate(self.names):
            values = per_function[:, column]
            values = values[~torch.isnan(values)]
            out[f"rewards/{name}/mean"] = float(values.mean()) if values.numel() else float("nan")
            out[f"rewards/{name}/std"] = float(values.std()) if values.numel() > 1 else 0.0
        return out


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _span(rows: list[int]) -> str:
    return f"{rows[0]}..{rows[-1]}" if len(rows) > 1 else str(rows[0])


def _call(func, name: str, kwargs: dict):
    """Call ``func`` with the keyword arguments it takes: all of them with ``**kwargs``, else the ones it names.
    A function whose two required parameters both have other names (``lambda p, c: ...``) keeps the older
    convention, ``f(prompts, completions)`` by position."""
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        return func(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return func(**kwargs)
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p for p in parameters if p.default is inspect.Parameter.empty and p.kind is not
                inspect.Parameter.VAR_POSITIONAL]
    missing = [p.name for p in required if p.name not in kwargs or p.kind not in by_name]
    if missing:
        if len(required) == 2 and all(p.kind is not inspect.Parameter.KEYWORD_ONLY and p.name not in kwargs
                                      for p in required):
            return func(kwargs["prompts"], kwargs["completions"])
        raise RewardFunctionError(
            f"reward function {name!r} needs the argument {missing[0]!r}, which is neither one of "
            f"{list(RESERVED)} nor a dataset column (columns: {sorted(set(kwargs) - set(RESERVED))})")
    return func(**{p.name: kwargs[p.name] for p in parameters if p.kind in by_name and p.name in kwargs})


def _check_scores(name: str, returned, rows: list[int]) -> torch.Tensor:
    """One finite float or None per row, as a float32 tensor with NaN for None."""
    if isinstance(returned, torch.Tensor):
        returned = returned.detach().cpu().reshape(-1).tolist() if returned.dim() <= 1 else returned
    elif hasattr(returned, "tolist") and not isinstance(returned, (str, bytes)):  # NumPy arrays
        returned = returned.tolist()
    if isinstance(returned, (str, bytes, dict)) or not isinstance(returned, Sequence):
        raise RewardFunctionError(f"reward function {name!r}: expected a list of {len(rows)} floats (one per "
                                  f"completion), got {type(returned).__name__}")
    if len(returned) != len(rows):
        raise RewardFunctionError(f"reward function {name!r}: returned {len(returned)} scores for {len(rows)} "
                                  f"completions (rows {_span(rows)})")
    values = []
    for row, value in zip(rows, returned):
        if value is None:
            values.append(float("nan"))
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardFunctionError(f"reward function {name!r}: row {row}: expected a float or None, got "
                                      f"{value!r} ({type(value).__name__})")
        if not math.isfinite(float(value)):
            raise NonFiniteRewardError(f"reward function {name!r}: row {row}: expected a finite float or None, "
                                      f"got {float(value)}")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float32)


def dataset_columns(dataset, name: str) -> dict[str, list]:
    """Every field but ``prompt`` of every record, as columns; all records must have the first one's fields."""
    first = dataset[0]
    keys = [k for k in first if k != "prompt"]
    clash = [k for k in keys if k in RESERVED]
    if clash:
        raise ValueError(f"{name}: field {clash[0]!r} clashes with a reward function argument "
                         f"({list(RESERVED)}); rename the field")
    columns: dict[str, list] = {k: [] for k in keys}
    for i in range(len(dataset)):
        record = dataset[i]
        for k in keys:
            if k not in record:
                raise ValueError(f"{name}[{i}]: missing field {k!r} (record 0 has {keys}; reward functions get "
                                 "every field as a column, so all records need the same fields)")
            columns[k].append(record[k])
    return columns


def load_reward_function(spec: str, base_dir: str = ".") -> Callable[..., Any]:
    """A function from ``"package.module:function"`` or ``"path/to/file.py:function"`` (relative to ``base_dir``)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward_funcs: expected 'module:function' or 'file.py:function', got {spec!r}")
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"reward_funcs: expected 'module:function' or 'file.py:function', got {spec!r}")
    if where.endswith(".py"):
        path = where if os.path.isabs(where) else os.path.join(base_dir, where)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reward_funcs: {spec!r}: file not found: {path}")
        module_name = f"rlhf_fast_reward_{abs(hash(os.path.abspath(path)))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - a user file: say which one failed to load
            raise ValueError(f"reward_funcs: {spec!r}: loading {path} raised {type(error).__name__}: {error}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise ValueError(f"reward_funcs: {spec!r}: cannot import module {where!r} ({error})") from None
    func = getattr(module, attr, None)
    if func is None or not callable(func):
        raise ValueError(f"reward_funcs: {spec!r}: {where} has no function {attr!r}")
    return func
