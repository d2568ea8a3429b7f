"""Direct preference optimisation losses on per-token log-probs (the reference for ``ops.dpo_loss``).

With ``pi_c, pi_r`` the policy's summed log-probs of the chosen / rejected completion, ``ref_c, ref_r`` the
reference's, and ``z = (pi_c - ref_c) - (pi_r - ref_r)`` (Rafailov et al., 2023), the per-pair losses are TRL's:

- ``sigmoid``: ``-(1 - eps) * logsigmoid(beta * z) - eps * logsigmoid(-beta * z)`` (cDPO label smoothing ``eps``)
- ``robust``:  ``(-(1 - eps) * logsigmoid(beta * z) + eps * logsigmoid(-beta * z)) / (1 - 2 * eps)`` (rDPO)
- ``hinge``:   ``relu(1 - beta * z)`` (SLiC)
- ``ipo``:     ``(z - 1 / (2 * beta))^2`` on log-probs averaged over each completion's tokens (IPO, as TRL)
- ``simpo``:   ``sigmoid`` on ``z = avg pi_c - avg pi_r - gamma / beta`` with averaged log-probs and no reference
  (SimPO; TRL's ``CPOTrainer(loss_type="simpo")``, ``simpo_gamma``)

``reference_free=True`` sets ``ref_c = ref_r = 0`` for any loss type. Implicit rewards are
``beta * (pi - ref)`` of each completion (averaged log-probs for ``ipo`` / ``simpo``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")
AVERAGED_LOSS_TYPES = ("ipo", "simpo")  # log-probs averaged over the completion's tokens
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "simpo")  # the loss types that take label_smoothing
STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def _sequence_sums(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.to(torch.float32)
    return (logp.float() * weights).sum(-1), weights.sum(-1)


def _ref_sums(ref: Optional[torch.Tensor], mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-token reference log-probs ``[B, T]`` are summed under the mask; per-sequence ``[B]`` are sums already."""
    if ref is None:
        return None
    return ref.float() if ref.dim() == 1 else _sequence_sums(ref, mask)[0]


def pair_losses(z: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """Per-pair losses of the log-ratio difference ``z`` (already shifted by ``gamma / beta`` for simpo)."""
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * z)
    if loss_type == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type: expected one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")


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
    num_pairs: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """``(loss, stats)``: the sum of the per-pair losses divided by ``num_pairs`` (default: the batch size ``B``);
    ``stats`` are the sums of the implicit rewards, their margin and ``reward_c > reward_r`` over the pairs, divided
    by the same count. ``chosen_logp[B, Tc]``, ``rejected_logp[B, Tr]`` with masks of their shapes; the reference
    log-probs are per token (the policy's shapes) or per-sequence sums ``[B]``."""
    pi_c, len_c = _sequence_sums(chosen_logp, chosen_mask)
    pi_r, len_r = _sequence_sums(rejected_logp, rejected_mask)
    use_ref = not reference_free and loss_type != "simpo"
    ref_c = _ref_sums(ref_chosen_logp, chosen_mask) if use_ref else None
    ref_r = _ref_sums(ref_rejected_logp, rejected_mask) if use_ref else None
    if use_ref and (ref_c is None or ref_r is None):
        raise ValueError("ref_chosen_logp / ref_rejected_logp: required unless reference_free=True or "
                         "loss_type='simpo'")
    if ref_c is not None:
        pi_c, pi_r = pi_c - ref_c, pi_r - ref_r  # log-ratios against the reference
    if loss_type in AVERAGED_LOSS_TYPES:
        pi_c, pi_r = pi_c / len_c.clamp(min=1), pi_r / len_r.clamp(min=1)
    z = pi_c - pi_r
    if loss_type == "simpo":
        z = z - simpo_gamma / beta
    count = float(num_pairs) if num_pairs is not None else float(max(1, chosen_logp.shape[0]))
    loss = pair_losses(z, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing).sum() / count
    with torch.no_grad():
        reward_c, reward_r = beta * pi_c.detach(), beta * pi_r.detach()
        stats = {"rewards/chosen": reward_c.sum() / count, "rewards/rejected": reward_r.sum() / count,
                 "rewards/accuracies": (reward_c > reward_r).float().sum() / count,
                 "rewards/margins": (reward_c - reward_r).sum() / count}
    return loss, stats
