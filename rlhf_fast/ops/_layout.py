"""Shared checks and layout changes for the loss ops: any per-token layout becomes rows x time ``[R, T]``."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validation as v
from ..reference.kl import KL_ESTIMATORS
from ..reference.losses import AGG_MODES


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[N]`` -> ``[1, N]`` (one sequence); ``[*, T]`` -> ``[prod(*), T]``; ``[R, T]`` as it is (no view op)."""
    if t.dim() == 2:
        return t
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # explicit rows: -1 is ambiguous when T == 0


def check_per_token_shape(name: str, value: torch.Tensor) -> None:
    v.check_min_ndim(name, value, 1, "a per-token tensor [N] or [*, T]")


def per_token(name: str, value, shape, ref_name: str, *, kind: str = "float") -> torch.Tensor:
    if kind == "float":
        v.check_float(name, value)
    else:
        v.check_mask(name, value)
    v.check_shape(name, value, shape, ref_name)
    return as_rows(value)


def advantages_as_rows(advantages, shape, ref_name: str) -> torch.Tensor:
    """Per-token advantages of ``shape``, or one per sequence ``[B]`` when ``shape`` is ``[B, T]``."""
    v.check_float("advantages", advantages)
    shape = tuple(shape)
    if tuple(advantages.shape) == shape:
        return as_rows(advantages)
    if len(shape) == 2 and tuple(advantages.shape) == shape[:1]:
        return advantages.unsqueeze(-1).expand(shape)
    per_seq = f" or {shape[:1]} (one per sequence)" if len(shape) == 2 else ""
    raise ValueError(
        f"advantages: expected shape {shape} (the shape of {ref_name}){per_seq}, got {tuple(advantages.shape)}"
    )


def check_clip_options(clip_low, clip_high, dual_clip) -> tuple[float, Optional[float], Optional[float]]:
    clip_low = v.check_number("clip_low", clip_low, at_least=0.0, at_most=1.0)
    if clip_high is not None:
        clip_high = v.check_number("clip_high", clip_high, at_least=0.0)
    if dual_clip is not None:
        dual_clip = v.check_number("dual_clip", dual_clip, greater_than=1.0)
    return clip_low, clip_high, dual_clip


def check_importance_sampling_level(level) -> str:
    v.check_option("importance_sampling_level", level, ("token", "sequence"))
    return level


def check_agg_options(agg, num_tokens, num_seqs, loss_scale) -> tuple[Optional[float], ...]:
    """Checks ``agg`` and the overrides; returns ``(num_tokens, num_seqs, loss_scale)`` as floats or None (tensors
    are read once, here), so that the kernels never read a tensor override again."""
    v.check_option("agg", agg, AGG_MODES)
    return (v.check_count("num_tokens", num_tokens), v.check_count("num_seqs", num_seqs),
            v.check_count("loss_scale", loss_scale))


def check_kl_entropy_options(ref_logp, kl_coef, kl_estimator, entropy_coef, shape, ref_name):
    kl_coef = v.check_number("kl_coef", kl_coef)
    entropy_coef = v.check_number("entropy_coef", entropy_coef)
    v.check_option("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if ref_logp is None:
        if kl_coef != 0.0:
            raise ValueError(f"ref_logp: expected a tensor of shape {tuple(shape)} when kl_coef != 0, got None")
        return None, kl_coef, entropy_coef
    return per_token("ref_logp", ref_logp, shape, ref_name), kl_coef, entropy_coef
