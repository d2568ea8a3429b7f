"""Fused linear log-probs / PPO loss from hidden states beside the plain matmuls and the unfused paths.

Full size (CUDA): ``N=8192`` tokens, ``H=4096``, ``V=151936`` (Qwen-sized vocabulary), bf16. Providers:
- ``matmul x1 (floor)`` / ``matmul x3 (floor)``: the plain ``[N, H] x [H, V]`` products of the unfused path,
  one for the forward, three for forward + backward (logits, d_hidden, d_weight): the compute floor;
- ``eager unfused`` (baseline): ``hidden @ weight.T``, float32 log-softmax, gather (autograd for the backward);
- ``trl ChunkedLogProb``: TRL's fused LM head (``trl.kernels.ChunkedLogProbFunction``, what its GRPO trainer runs:
  cuBLAS tiles of the vocabulary chunk its trainer uses, a Triton fold on CUDA, torch ops on CPU); in the PPO loss
  row followed by the loss math in eager PyTorch, as that trainer does;
- ``liger FLCE``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (cross entropy = -logp; Triton, CUDA only);
- ``liger FusedLinearGRPOLoss``: Liger's chunked fused linear GRPO loss (``compiled=False``: no torch.compile time),
  ``loss_type="bnpo"`` (= our token-mean), the same ref log-probs, beta and clip bounds, PPO loss row;
- ``trl FusedLinearGRPOLoss``: ``trl.losses.FusedLinearGRPOLoss``, for TRL versions that have it (1.16 does not);
- ``rlhf_fast ...``: ours, through ``rlhf_fast.ops`` (the Triton kernels on CUDA).
Peers run only when importable; one that is missing or broken is skipped with a one-line reason.
Every fwd+bwd provider returns the gradients of both ``hidden`` and ``weight`` via ``torch.autograd.grad`` (no
``.grad`` accumulation). TFLOP/s are *useful* work: ``2NHV`` for the forward, ``6NHV`` for forward + backward.
Quick mode: tiny shapes on CPU in seconds (the peers that run on CPU included).
"""
from __future__ import annotations

import torch

from .. import ops, reference
from .._dispatch import select_backend
from .harness import Bench, optional


def _ours(bench: Bench) -> str:
    return "rlhf_fast (triton)" if select_backend(bench.device) == "triton" else "rlhf_fast (torch ref)"


def _eager_logprobs(hidden, weight, labels):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _load_trl_chunked():
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils  # the backward imports it (and through it `datasets`): fail here

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)  # the vocabulary chunk of TRL's fused LM head

    def logprobs(hidden, weight, labels):
        # apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs): log-probs only
        return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, chunk, None, 1.0, ("log_probs",))[0]

    return logprobs


def _load_liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def _load_liger_grpo(kl_coef, clip_low, clip_high):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=kl_coef, compiled=False, use_ref_model=True, epsilon_low=clip_low,
                                    epsilon_high=clip_high, loss_type="bnpo")


def _load_trl_losses():
    from trl.losses import FusedLinearGRPOLoss

    return FusedLinearGRPOLoss(beta=0.04, use_ref_model=False, loss_type="bnpo", compiled=False)


def run(bench: Bench) -> None:
    device = bench.device
    if bench.quick:
        n, h, v, dtype = 256, 64, 1000, (torch.bfloat16 if bench.on_cuda else torch.float32)
    else:
        n, h, v, dtype = 8192, 4096, 151936, torch.bfloat16
    rows = 8
    steps = n // rows
    shape = f"N{n}xH{h}xV{v}"
    dname = str(dtype).replace("torch.", "")
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) * h**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    fwd_flops, step_flops = 2.0 * n * h * v, 6.0 * n * h * v
    ours = _ours(bench)
    both = (hidden, weight)
    trl_logprobs = optional("trl ChunkedLogProbFunction", _load_trl_chunked)

    # ---- forward, no grad (old-policy / reference log-probs) ----------------------------------------------
    op = "linear_logprobs fwd (no grad)"
    with torch.no_grad():
        h0, w0 = hidden.detach(), weight.detach()
        bench.measure(op, "matmul x1 (floor)", shape, dname, lambda: h0 @ w0.t(), flops=fwd_flops)
        bench.measure(op, "eager unfused", shape, dname, lambda: _eager_logprobs(h0, w0, labels),
                      flops=fwd_flops, baseline=True)
        if trl_logprobs is not None:
            bench.measure(op, "trl ChunkedLogProb", shape, dname, lambda: trl_logprobs(h0, w0, labels),
                          flops=fwd_flops)
        bench.measure(op, ours, shape, dname, lambda: ops.linear_logprobs(h0, w0, labels), flops=fwd_flops)

    # ---- forward + backward of per-token log-probs ----------------------------------------------------------
    op = "linear_logprobs fwd+bwd"
    grad_logp = torch.randn(n, device=device)

    def three_matmuls():
        with torch.no_grad():
            logits = hidden @ weight.t()
            return logits @ weight, logits.t() @ hidden

    def eager_step():
        return torch.autograd.grad(_eager_logprobs(hidden, weight, labels), both, grad_logp)

    def ours_step():
        return torch.autograd.grad(ops.linear_logprobs(hidden, weight, labels), both, grad_logp)

    bench.measure(op, "matmul x3 (floor)", shape, dname, three_matmuls, flops=step_flops)
    bench.measure(op, "eager unfused", shape, dname, eager_step, flops=step_flops, baseline=True)
    if trl_logprobs is not None:
        bench.measure(op, "trl ChunkedLogProb", shape, dname,
                      lambda: torch.autograd.grad(trl_logprobs(hidden, weight, labels), both, grad_logp),
                      flops=step_flops)
    # Liger's FLCE is a Triton kernel: CUDA only. Its upstream gradient is all ones (sum reduction): same work.
    liger = optional("liger FLCE", _load_liger_flce) if bench.on_cuda else None
    if liger is not None:
        bench.measure(op, "liger FLCE", shape, dname,
                      lambda: torch.autograd.grad(liger(weight, hidden, labels), both), flops=step_flops)
    bench.measure(op, ours, shape, dname, ours_step, flops=step_flops)

    # ---- PPO policy loss from hidden states ---------------------------------------------------------------
    op = "ppo loss fwd+bwd"
    with torch.no_grad():
        logp0 = reference.linear_logprobs(hidden.detach(), weight.detach(), labels).view(rows, steps)
    old = logp0 + 0.1 * torch.randn(rows, steps, device=device)
    ref = logp0 + 0.1 * torch.randn(rows, steps, device=device)
    adv = torch.randn(rows, device=device)
    mask = torch.rand(rows, steps, device=device) > 0.1
    kl_coef, clip_low, clip_high = 0.04, 0.2, 0.28
    kwargs = dict(ref_logp=ref, kl_coef=kl_coef, clip_low=clip_low, clip_high=clip_high)
    h3, lab2 = hidden.view(rows, steps, h), labels.view(rows, steps)
    maskf = mask.float()  # the peers take a float mask: cast once, outside the timing

    def eager_ppo():
        logits = (hidden @ weight.t()).view(rows, steps, v)
        loss, _ = reference.fused_ppo_loss(logits, lab2, old, adv, mask, **kwargs)
        return torch.autograd.grad(loss, both)

    def ours_ppo():
        loss, _ = ops.fused_linear_ppo_loss(h3, weight, lab2, old, adv, mask, **kwargs)
        return torch.autograd.grad(loss, both)

    bench.measure(op, "matmul x3 (floor)", shape, dname, three_matmuls, flops=step_flops)
    bench.measure(op, "eager unfused", shape, dname, eager_ppo, flops=step_flops, baseline=True)
    if trl_logprobs is not None:
        def trl_ppo():  # TRL's GRPO trainer path: fused LM head log-probs, then the loss math in eager PyTorch
            logp = trl_logprobs(hidden, weight, labels).view(rows, steps)
            loss, _ = reference.policy_loss_terms(logp, logp, old, adv, mask, **kwargs)  # entropy unused (coef 0)
            return torch.autograd.grad(loss, both)

        bench.measure(op, "trl ChunkedLogProb + eager loss", shape, dname, trl_ppo, flops=step_flops)
    liger_grpo = optional("liger FusedLinearGRPOLoss", lambda: _load_liger_grpo(kl_coef, clip_low, clip_high))
    if liger_grpo is not None:
        def liger_step():
            loss, _ = liger_grpo(h3, weight, lab2, maskf, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            return torch.autograd.grad(loss, both)

        bench.measure(op, "liger FusedLinearGRPOLoss (bnpo)", shape, dname, liger_step, flops=step_flops)
    trl_loss = optional("trl.losses.FusedLinearGRPOLoss", _load_trl_losses)
    if trl_loss is not None:
        def trl_step():
            out = trl_loss(h3, weight, lab2, maskf, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(loss, both)

        bench.measure(op, "trl FusedLinearGRPOLoss", shape, dname, trl_step, flops=step_flops)
    bench.measure(op, ours, shape, dname, ours_ppo, flops=step_flops)
