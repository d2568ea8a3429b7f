"""One DPO step from hidden states: ``linear_logprobs`` + ``dpo_loss`` against the eager logits path.

The step: per-token log-probs of the chosen and rejected completions of ``P`` pairs (``2P`` rows of ``T`` tokens)
from the last hidden states and the LM head, the sigmoid DPO loss against precomputed reference sums, and the
gradients of ``hidden`` and ``weight``. Providers:
- ``eager logits`` (baseline): ``hidden @ weight.T``, float32 log-softmax, gather, then the reference DPO loss
  (autograd for the backward): what a DPO trainer that asks the model for its logits does;
- ``liger FusedLinearDPOLoss``: Liger-Kernel's chunked fused linear DPO loss (CUDA only, when installed);
- ``rlhf_fast ...``: ``ops.linear_logprobs`` (never builds the ``[N, V]`` logits) then ``ops.dpo_loss``.
Shapes: the GPU preset (CUDA) ``P=4`` pairs of ``T=1024`` (``N=8192`` tokens), ``H=4096``, ``V=151936``, bf16; the CPU
preset ``P=8``, ``T=256`` (``N=4096``, four of the CPU reference's 1024-token chunks), ``H=64``, ``V=8192``, fp32;
quick mode tiny. Peak extra memory as the harness measures it.
"""
from __future__ import annotations

import torch

from .. import ops, reference
from .._dispatch import select_backend
from .harness import Bench, optional


def _load_liger_dpo(beta):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    return LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=False)


def run(bench: Bench) -> None:
    device = bench.device
    if bench.quick:
        pairs, steps, h, v, dtype = 2, 32, 64, 1000, (torch.bfloat16 if bench.on_cuda else torch.float32)
    elif bench.on_cuda:
        pairs, steps, h, v, dtype = 4, 1024, 4096, 151936, torch.bfloat16
    else:
        pairs, steps, h, v, dtype = 8, 256, 64, 8192, torch.float32  # N = 4096: four of the reference's chunks
    rows, n = 2 * pairs, 2 * pairs * steps
    shape = f"P{pairs}xT{steps}xH{h}xV{v}"
    dname = str(dtype).replace("torch.", "")
    beta = 0.1
    torch.manual_seed(0)
    hidden = (torch.randn(rows, steps, h, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) * h**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (rows, steps), device=device)
    mask = torch.ones(rows, steps, dtype=torch.bool, device=device)
    mask[:, : steps // 4] = False  # the prompt: no loss there
    with torch.no_grad():
        ref_sums = (reference.linear_logprobs(hidden.detach().reshape(n, h), weight.detach(), labels.reshape(n))
                    .view(rows, steps) * mask).sum(-1) + 0.1 * torch.randn(rows, device=device)
    ref_c, ref_r = ref_sums[:pairs], ref_sums[pairs:]
    both = (hidden, weight)
    flops = 6.0 * n * h * v
    ours = "rlhf_fast (triton)" if select_backend(device) == "triton" else "rlhf_fast (torch ref)"

    def loss_of(logp):
        loss, _ = ops.dpo_loss(logp[:pairs], logp[pairs:], mask[:pairs], mask[pairs:], ref_chosen_logp=ref_c,
                               ref_rejected_logp=ref_r, beta=beta)
        return loss

    def eager_step():
        logits = hidden @ weight.t()
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss, _ = reference.dpo_loss(logp[:pairs], logp[pairs:], mask[:pairs], mask[pairs:], ref_chosen_logp=ref_c,
                                     ref_rejected_logp=ref_r, beta=beta)
        return torch.autograd.grad(loss, both)

    def ours_step():
        return torch.autograd.grad(loss_of(ops.linear_logprobs(hidden, weight, labels)), both)

    op = "dpo step fwd+bwd (from hidden)"
    providers = [("eager logits", eager_step, True)]
    liger = optional("liger FusedLinearDPOLoss", lambda: _load_liger_dpo(beta)) if bench.on_cuda else None
    if liger is not None:
        def liger_step():  # Liger takes [chosen; rejected] rows and masks the prompt with ignore_index labels
            target = labels.masked_fill(~mask, -100)
            out = liger(weight, hidden, target)
            return torch.autograd.grad(out[0] if isinstance(out, tuple) else out, both)

        providers.append(("liger FusedLinearDPOLoss (no ref)", liger_step, False))
    providers.append((ours, ours_step, False))
    for name, fn, baseline in providers:
        bench.measure(op, name, shape, dname, fn, flops=flops, baseline=baseline,
                      rep=None if bench.on_cuda or bench.quick else 5)
