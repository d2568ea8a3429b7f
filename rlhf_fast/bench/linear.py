"""Fused linear log-probs / PPO loss from hidden states beside the plain matmuls and the unfused paths.

Full size (CUDA): ``N=8192`` tokens, ``H=4096``, ``V=151936`` (Qwen-sized vocabulary), bf16. Providers:
- ``matmul x1 (floor)`` / ``matmul x3 (floor)``: the plain ``[N, H] x [H, V]`` products of the unfused path,
  one for the forward, three for forward + backward (logits, d_hidden, d_weight): the compute floor;
- ``eager unfused`` (baseline): ``hidden @ weight.T``, float32 log-softmax, gather (autograd for the backward);
- ``liger FLCE``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (cross entropy = -logp), when importable;
- ``trl FusedLinearGRPOLoss``: TRL's chunked fused linear PPO-style loss (pure PyTorch), when importable;
- ``rlhf_fast ...``: ours, through ``rlhf_fast.ops`` (the Triton kernels on CUDA).
Every fwd+bwd provider returns the gradients of both ``hidden`` and ``weight`` via ``torch.autograd.grad`` (no
``.grad`` accumulation). TFLOP/s are *useful* work: ``2NHV`` for the forward, ``6NHV`` for forward + backward.
Quick mode: tiny shapes on CPU, reference providers only, in seconds.
"""
from __future__ import annotations

import torch

from .. import ops, reference
from .._dispatch import select_backend
from .harness import Bench


def _ours(bench: Bench) -> str:
    return "rlhf_fast (triton)" if select_backend(bench.device) == "triton" else "rlhf_fast (torch ref)"


def _eager_logprobs(hidden, weight, labels):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _optional_liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - not installed or broken: skip the provider
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def _optional_trl():
    try:
        from trl.losses import FusedLinearGRPOLoss
    except Exception:  # noqa: BLE001
        return None
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

    # ---- forward, no grad (old-policy / reference log-probs) ----------------------------------------------
    op = "linear_logprobs fwd (no grad)"
    with torch.no_grad():
        h0, w0 = hidden.detach(), weight.detach()
        bench.measure(op, "matmul x1 (floor)", shape, dname, lambda: h0 @ w0.t(), flops=fwd_flops)
        bench.measure(op, "eager unfused", shape, dname, lambda: _eager_logprobs(h0, w0, labels),
                      flops=fwd_flops, baseline=True)
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
    liger = _optional_liger()
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
    kwargs = dict(ref_logp=ref, kl_coef=0.04, clip_low=0.2, clip_high=0.28)
    h3, lab2 = hidden.view(rows, steps, h), labels.view(rows, steps)

    def eager_ppo():
        logits = (hidden @ weight.t()).view(rows, steps, v)
        loss, _ = reference.fused_ppo_loss(logits, lab2, old, adv, mask, **kwargs)
        return torch.autograd.grad(loss, both)

    def ours_ppo():
        loss, _ = ops.fused_linear_ppo_loss(h3, weight, lab2, old, adv, mask, **kwargs)
        return torch.autograd.grad(loss, both)

    bench.measure(op, "matmul x3 (floor)", shape, dname, three_matmuls, flops=step_flops)
    bench.measure(op, "eager unfused", shape, dname, eager_ppo, flops=step_flops, baseline=True)
    trl_loss = _optional_trl()
    if trl_loss is not None:
        def trl_step():
            out = trl_loss(h3, weight, lab2, mask.float(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(loss, both)

        bench.measure(op, "trl FusedLinearGRPOLoss", shape, dname, trl_step, flops=step_flops)
    bench.measure(op, ours, shape, dname, ours_ppo, flops=step_flops)
