"""Public DPO loss op (docs/API.md): per-token log-probs of chosen and rejected completions -> scalar loss."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as v
from .._dispatch import resolve
from ..reference.dpo import DPO_LOSS_TYPES, SMOOTHED_LOSS_TYPES


def _per_token_pair(logp_name, logp, mask_name, mask, batch: Optional[int]) -> int:
    v.check_float(logp_name, logp)
    v.check_ndim(logp_name, logp, (2,), "per-token log-probs [B, T]")
    v.check_mask(mask_name, mask)
    v.check_shape(mask_name, mask, logp.shape, logp_name)
    if batch is not None and logp.shape[0] != batch:
        raise ValueError(f"{logp_name}: expected {batch} rows (one per pair, as chosen_logp), got shape "
                         f"{tuple(logp.shape)}")
    return logp.shape[0]


def _check_ref(name: str, ref, policy_name: str, policy: torch.Tensor) -> None:
    v.check_float(name, ref)
    if tuple(ref.shape) not in (tuple(policy.shape), tuple(policy.shape[:1])):
        raise ValueError(f"{name}: expected shape {tuple(policy.shape)} (per token, as {policy_name}) or "
                         f"{tuple(policy.shape[:1])} (per-sequence sums), got {tuple(ref.shape)}")


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    ref_chosen_logp: Optional[torch.Tensor] = None,
    ref_rejected_logp: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    reference_free: bool = False,
    num_pairs=None,
) -> tuple[torch.Tensor, dict]:
    """DPO-family loss of ``B`` preference pairs from per-token log-probs; returns ``(loss, stats)``.

    ``chosen_logp[B, Tc]`` / ``rejected_logp[B, Tr]`` with 0/1 masks of the same shapes (1 = a completion token);
    ``ref_*_logp`` per token (same shapes) or per-sequence sums ``[B]``; required unless ``reference_free`` or
    ``loss_type='simpo'``. ``loss_type`` in ``sigmoid | robust | hinge | ipo | simpo`` (formulas in
    ``rlhf_fast.reference.dpo``); ``label_smoothing`` in ``[0, 0.5)`` for ``sigmoid`` / ``robust`` / ``simpo``.
    The loss is the sum over pairs divided by ``num_pairs`` (default ``B``; pass the global pair count under
    gradient accumulation or data parallelism). ``stats`` (float32 0-d, same divisor): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``. Differentiable in ``chosen_logp`` and
    ``rejected_logp`` (and the reference log-probs when they require grad).
    """
    batch = _per_token_pair("chosen_logp", chosen_logp, "chosen_mask", chosen_mask, None)
    _per_token_pair("rejected_logp", rejected_logp, "rejected_mask", rejected_mask, batch)
    v.check_option("loss_type", loss_type, DPO_LOSS_TYPES)
    if not isinstance(reference_free, bool):
        raise TypeError(f"reference_free: expected a bool, got {type(reference_free).__name__}")
    beta = v.check_number("beta", beta, greater_than=0.0)
    simpo_gamma = v.check_number("simpo_gamma", simpo_gamma)
    label_smoothing = v.check_number("label_smoothing", label_smoothing, at_least=0.0)
    if label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(f"label_smoothing: {loss_type!r} takes no label smoothing (only "
                         f"{list(SMOOTHED_LOSS_TYPES)}), got {label_smoothing}")
    uses_ref = not reference_free and loss_type != "simpo"
    if uses_ref:
        for name, value, policy_name, policy in (("ref_chosen_logp", ref_chosen_logp, "chosen_logp", chosen_logp),
                                                  ("ref_rejected_logp", ref_rejected_logp, "rejected_logp",
                                                   rejected_logp)):
            if value is None:
                raise ValueError(f"{name}: expected the reference's log-probs (loss_type={loss_type!r} compares "
                                 "against a reference), got None; or pass reference_free=True")
            _check_ref(name, value, policy_name, policy)
    else:  # not read: the reference-free losses ignore them
        ref_chosen_logp = ref_rejected_logp = None
    v.check_same_device(dict(chosen_logp=chosen_logp, rejected_logp=rejected_logp, chosen_mask=chosen_mask,
                             rejected_mask=rejected_mask, ref_chosen_logp=ref_chosen_logp,
                             ref_rejected_logp=ref_rejected_logp))
    num_pairs = v.check_count("num_pairs", num_pairs)
    impl = resolve("dpo_loss", chosen_logp.device)
    return impl(chosen_logp, rejected_logp, chosen_mask, rejected_mask, ref_chosen_logp=ref_chosen_logp,
                ref_rejected_logp=ref_rejected_logp, beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, reference_free=reference_free,
                num_pairs=num_pairs)
