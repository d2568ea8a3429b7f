"""Triton DPO loss: one launch reduces each pair's four per-token rows and computes its loss and gradient factors.

One program per pair: masked sums (and token counts) of the chosen and rejected log-probs of the policy and, per
token, of the reference; the log-ratio difference ``z``; the pair's loss and ``dloss/dz`` folded with the
length normalisation into one factor per completion. The backward is then an outer product,
``grad_logp[b, t] = g * factor[b] * mask[b, t]``, which PyTorch does in one elementwise op. Why a kernel at all:
the reference takes about 25 small launches for a handful of ``[B, T]`` tensors; this takes one plus the mean.
Memory is not the point here (the DPO inputs are per token, a few ``[B, T]`` floats): the memory of a DPO step
is in the log-probs, which ``linear_logprobs`` computes from hidden states.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only

LOSS_CODES = {"sigmoid": 0, "simpo": 0, "robust": 1, "hinge": 2, "ipo": 3}
REF_NONE, REF_PER_SEQUENCE, REF_PER_TOKEN = 0, 1, 2
BLOCK_T = 128


@triton.jit
def _masked_row_sum(logp_ptr, mask_ptr, steps, BLOCK: tl.constexpr):
    """``(sum_t logp * mask, sum_t mask)`` of one contiguous row, in float32, fixed order."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    count = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, steps, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < steps
        weight = tl.load(mask_ptr + offs, mask=inside, other=0).to(tl.float32)
        logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        total += logp * weight
        count += weight
    return tl.sum(total, axis=0), tl.sum(count, axis=0)


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _pair_loss(z, BETA: tl.constexpr, EPS: tl.constexpr, LOSS: tl.constexpr):
    """``(loss, dloss/dz)`` of one pair (formulas in rlhf_fast.reference.dpo)."""
    x = BETA * z
    if LOSS == 0:  # sigmoid / simpo
        loss = -(1.0 - EPS) * _log_sigmoid(x) - EPS * _log_sigmoid(-x)
        dz = BETA * (-(1.0 - EPS) * tl.sigmoid(-x) + EPS * tl.sigmoid(x))
    elif LOSS == 1:  # robust
        loss = (-(1.0 - EPS) * _log_sigmoid(x) + EPS * _log_sigmoid(-x)) / (1.0 - 2.0 * EPS)
        dz = BETA * (-(1.0 - EPS) * tl.sigmoid(-x) - EPS * tl.sigmoid(x)) / (1.0 - 2.0 * EPS)
    elif LOSS == 2:  # hinge
        loss = tl.maximum(1.0 - x, 0.0)
        dz = tl.where(1.0 - x > 0.0, -BETA, 0.0)
    else:  # ipo
        d = z - 0.5 / BETA
        loss = d * d
        dz = 2.0 * d
    return loss, dz


@triton.jit
def _dpo_fwd_kernel(
    chosen_ptr, chosen_mask_ptr, rejected_ptr, rejected_mask_ptr, ref_chosen_ptr, ref_rejected_ptr, out_ptr,
    chosen_steps, rejected_steps,
    BETA: tl.constexpr, EPS: tl.constexpr, SHIFT: tl.constexpr, LOSS: tl.constexpr, AVERAGE: tl.constexpr,
    REF: tl.constexpr, BLOCK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    c_row, r_row = pair * chosen_steps, pair * rejected_steps
    pi_c, len_c = _masked_row_sum(chosen_ptr + c_row, chosen_mask_ptr + c_row, chosen_steps, BLOCK)
    pi_r, len_r = _masked_row_sum(rejected_ptr + r_row, rejected_mask_ptr + r_row, rejected_steps, BLOCK)
    if REF == 2:  # per token, under the policy's masks
        ref_c, _ = _masked_row_sum(ref_chosen_ptr + c_row, chosen_mask_ptr + c_row, chosen_steps, BLOCK)
        ref_r, _ = _masked_row_sum(ref_rejected_ptr + r_row, rejected_mask_ptr + r_row, rejected_steps, BLOCK)
        pi_c -= ref_c
        pi_r -= ref_r
    elif REF == 1:  # per-sequence sums
        pi_c -= tl.load(ref_chosen_ptr + pair).to(tl.float32)
        pi_r -= tl.load(ref_rejected_ptr + pair).to(tl.float32)
    inv_c = 1.0
    inv_r = 1.0
    if AVERAGE:
        inv_c = 1.0 / tl.maximum(len_c, 1.0)
        inv_r = 1.0 / tl.maximum(len_r, 1.0)
        pi_c = pi_c * inv_c
        pi_r = pi_r * inv_r
    loss, dz = _pair_loss(pi_c - pi_r - SHIFT, BETA, EPS, LOSS)
    # per pair: loss, d loss / d chosen token, d loss / d rejected token, reward chosen, reward rejected
    out = out_ptr + pair * 5
    tl.store(out, loss)
    tl.store(out + 1, dz * inv_c)
    tl.store(out + 2, -dz * inv_r)
    tl.store(out + 3, BETA * pi_c)
    tl.store(out + 4, BETA * pi_r)


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()


class DPOPairLosses(torch.autograd.Function):
    """``(losses[B], rewards[B, 2])`` of ``B`` pairs; gradients for the log-probs (rewards are not differentiable)."""

    @staticmethod
    def forward(ctx, chosen, rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask, options):
        beta, eps, shift, loss_type, ref_mode = options
        pairs = chosen.shape[0]
        out = torch.empty(pairs, 5, dtype=torch.float32, device=chosen.device)
        c, r = chosen.contiguous(), rejected.contiguous()
        cm, rm = _kernel_mask(chosen_mask), _kernel_mask(rejected_mask)
        rc = c if ref_chosen is None else ref_chosen.contiguous()
        rr = r if ref_rejected is None else ref_rejected.contiguous()
        if pairs:
            _dpo_fwd_kernel[(pairs,)](
                c, cm, r, rm, rc, rr, out, c.shape[1], r.shape[1], BETA=beta, EPS=eps, SHIFT=shift,
                LOSS=LOSS_CODES[loss_type], AVERAGE=loss_type in ("ipo", "simpo"), REF=ref_mode, BLOCK=BLOCK_T,
            )
        ctx.save_for_backward(out, chosen_mask, rejected_mask)
        ctx.meta = (chosen.dtype, rejected.dtype, ref_mode)
        rewards = out[:, 3:].clone()
        ctx.mark_non_differentiable(rewards)
        return out[:, 0].clone(), rewards

    @staticmethod
    @first_order_only
    def backward(ctx, grad_losses, _grad_rewards):
        out, chosen_mask, rejected_mask = ctx.saved_tensors
        chosen_dtype, rejected_dtype, ref_mode = ctx.meta
        factor_c = (grad_losses * out[:, 1]).unsqueeze(-1)
        factor_r = (grad_losses * out[:, 2]).unsqueeze(-1)
        grad_c = factor_c * chosen_mask.to(torch.float32)
        grad_r = factor_r * rejected_mask.to(torch.float32)
        need = ctx.needs_input_grad

        def ref_grad(grad, factor, wanted):
            if not wanted:
                return None
            return -(grad if ref_mode == REF_PER_TOKEN else factor.squeeze(-1))

        return (grad_c.to(chosen_dtype) if need[0] else None, grad_r.to(rejected_dtype) if need[1] else None,
                ref_grad(grad_c, factor_c, need[2]), ref_grad(grad_r, factor_r, need[3]), None, None, None)


def dpo_loss(chosen_logp, rejected_logp, chosen_mask, rejected_mask, *, ref_chosen_logp=None,
             ref_rejected_logp=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5,
             reference_free=False, num_pairs=None):
    """Triton ``dpo_loss``: same signature and numbers as ``rlhf_fast.reference.dpo.dpo_loss``."""
    if loss_type not in LOSS_CODES:
        raise ValueError(f"loss_type: expected one of {list(LOSS_CODES)}, got {loss_type!r}")
    if reference_free or loss_type == "simpo":
        ref_chosen_logp = ref_rejected_logp = None
    if ref_chosen_logp is None:
        ref_mode = REF_NONE
    else:
        ref_mode = REF_PER_SEQUENCE if ref_chosen_logp.dim() == 1 else REF_PER_TOKEN
        if (ref_rejected_logp.dim() == 1) != (ref_mode == REF_PER_SEQUENCE):  # one layout for the kernel
            ref_chosen_logp, ref_rejected_logp = _as_sums(ref_chosen_logp, chosen_mask), _as_sums(
                ref_rejected_logp, rejected_mask)
            ref_mode = REF_PER_SEQUENCE
    shift = simpo_gamma / beta if loss_type == "simpo" else 0.0
    losses, rewards = DPOPairLosses.apply(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp,
                                          chosen_mask, rejected_mask,
                                          (float(beta), float(label_smoothing), float(shift), loss_type, ref_mode))
    count = float(num_pairs) if num_pairs is not None else float(max(1, chosen_logp.shape[0]))
    reward_c, reward_r = rewards[:, 0], rewards[:, 1]
    stats = {"rewards/chosen": reward_c.sum() / count, "rewards/rejected": reward_r.sum() / count,
             "rewards/accuracies": (reward_c > reward_r).float().sum() / count,
             "rewards/margins": (reward_c - reward_r).sum() / count}
    return losses.sum() / count, stats


def _as_sums(ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ref if ref.dim() == 1 else (ref.float() * mask.to(torch.float32)).sum(-1)


KERNELS = {"dpo_loss": dpo_loss}
