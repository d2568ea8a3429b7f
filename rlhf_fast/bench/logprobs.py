"""Log-probs, entropy and the fused PPO loss from logits, beside the baselines a user would pick instead.

Full size (CUDA): logits ``B=4, T=2048, V=151936`` (Qwen-sized vocabulary) in bf16. Ops and providers:

- ``selective_log_softmax fwd`` (no grad: old-policy / reference log-probs):
  ``torch-eager`` (the reference, baseline), ``torch-compile`` (of the reference), ``trl row loop`` (TRL's
  ``selective_log_softmax`` for bf16: ``log_softmax`` per row of the batch, then gather), ``liger`` (Liger-Kernel's
  ``fused_selective_log_softmax``, when importable), ``rlhf_fast ops`` (the public op: validation, including the
  one-sync label range check, then the kernel) and ``rlhf_fast kernel`` (the Triton kernel called directly).
- ``logprobs_and_entropy fwd`` (no grad): eager, compile, ours.
- ``fused_ppo_loss fwd+bwd`` (GRPO-style: per-sequence advantages, k3 KL to a reference with ``kl_coef=0.04``,
  clip 0.2 / 0.28, temperature 0.9, ``seq-mean-token-mean``): eager reference with autograd, compile of it,
  ``liger`` (``triton_grpo_loss``, ``inplace=True``, ``loss_type="grpo"`` = seq-mean-token-mean, ``reduce=True``:
  a scalar loss, same options), ours with ``inplace_grad=True`` and ``False``.

``bytes_moved``: the logits read once plus the per-token outputs for the forwards; for the loss forward + backward
the logits read twice plus the gradient written once (Liger's and our two-pass bound), so GB/s and % of copy
bandwidth read as "fraction of the two-pass roofline". Quick mode: tiny shapes; on CPU only the PyTorch
providers run (the Triton ones need CUDA; CPU interpretation would time the interpreter).
"""
from __future__ import annotations

import torch

from .. import ops, reference
from .harness import Bench, optional

GRPO = dict(kl_coef=0.04, kl_estimator="k3", temperature=0.9, clip_low=0.2, clip_high=0.28,
            agg="seq-mean-token-mean")


def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: exact logsumexp for fp32 / fp64, a per-row ``log_softmax`` loop otherwise."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    out = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = torch.nn.functional.log_softmax(row_logits, dim=-1)
        out.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def _load_liger():
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    return fused_selective_log_softmax, triton_grpo_loss


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _measure_compiled(bench: Bench, op, shape, dtype, make_fn, **kw):
    try:
        bench.measure(op, "torch-compile", shape, dtype, make_fn(), **kw)
    except Exception as exc:  # noqa: BLE001 - an Inductor failure is a result, not a crash of the suite
        print(f"  {op:28s} {'torch-compile':24s} {shape:24s} failed: {str(exc).splitlines()[0][:80]}")


def run(bench: Bench) -> None:
    device = bench.device
    if bench.quick:
        b, t, v = 2, 16, 1000
        dtype = torch.bfloat16 if bench.on_cuda else torch.float32
    else:
        b, t, v = 4, 2048, 151936
        dtype = torch.bfloat16
    n = b * t
    shape = f"B{b}xT{t}xV{v}"
    dname = str(dtype).replace("torch.", "")
    torch.manual_seed(0)
    logits = (torch.randn(b, t, v, device=device) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), device=device)
    logits_bytes = logits.numel() * logits.element_size()
    triton_ok = bench.on_cuda
    compile_ok = bench.on_cuda or not bench.quick  # Inductor compiles take tens of seconds on a small CPU
    liger = optional("liger (Triton kernels)", _load_liger) if triton_ok else None
    liger_slsm, liger_grpo = liger or (None, None)
    if triton_ok:
        from ..kernels import fused_loss as fused_kernels
        from ..kernels import logprobs as kernels

    flat_logits, flat_labels = logits.view(n, v), labels.view(n)

    # ---- selective_log_softmax, no grad --------------------------------------------------------------------
    op = "selective_log_softmax fwd"
    fwd_bytes = logits_bytes + labels.numel() * labels.element_size() + n * 4
    with torch.no_grad():
        bench.measure(op, "torch-eager", shape, dname,
                      lambda: reference.selective_log_softmax(flat_logits, flat_labels),
                      bytes_moved=fwd_bytes, baseline=True)
        if compile_ok:
            _measure_compiled(bench, op, shape, dname, lambda: (lambda f: lambda: f(flat_logits, flat_labels))(
                _compiled(reference.selective_log_softmax)), bytes_moved=fwd_bytes)
        bench.measure(op, "trl row loop", shape, dname, lambda: trl_selective_log_softmax(logits, labels),
                      bytes_moved=fwd_bytes)
        if liger_slsm is not None:
            # Liger reads logits [B, T + 1, V] (it drops the last position); same bytes per measured row.
            padded = torch.cat([logits, logits[:, :1]], dim=1)
            bench.measure(op, "liger", shape, dname, lambda: liger_slsm(padded, labels, 1.0), bytes_moved=fwd_bytes)
            del padded
        if triton_ok:
            bench.measure(op, "rlhf_fast ops", shape, dname, lambda: ops.selective_log_softmax(logits, labels),
                          bytes_moved=fwd_bytes)
            bench.measure(op, "rlhf_fast kernel", shape, dname,
                          lambda: kernels.selective_log_softmax(flat_logits, flat_labels), bytes_moved=fwd_bytes)

    # ---- logprobs_and_entropy, no grad ---------------------------------------------------------------------
    op = "logprobs_and_entropy fwd"
    ent_bytes = fwd_bytes + n * 4
    with torch.no_grad():
        bench.measure(op, "torch-eager", shape, dname,
                      lambda: reference.logprobs_and_entropy(flat_logits, flat_labels),
                      bytes_moved=ent_bytes, baseline=True)
        if compile_ok:
            _measure_compiled(bench, op, shape, dname, lambda: (lambda f: lambda: f(flat_logits, flat_labels))(
                _compiled(reference.logprobs_and_entropy)), bytes_moved=ent_bytes)
        if triton_ok:
            bench.measure(op, "rlhf_fast ops", shape, dname, lambda: ops.logprobs_and_entropy(logits, labels),
                          bytes_moved=ent_bytes)
            bench.measure(op, "rlhf_fast kernel", shape, dname,
                          lambda: kernels.logprobs_and_entropy(flat_logits, flat_labels), bytes_moved=ent_bytes)

    # ---- fused PPO loss, forward + backward ----------------------------------------------------------------
    op = "fused_ppo_loss fwd+bwd"
    loss_bytes = 3 * logits_bytes
    logp = reference.selective_log_softmax(flat_logits, flat_labels, temperature=GRPO["temperature"]).view(b, t)
    old = logp + 0.1 * torch.randn(b, t, device=device)
    ref_logp = logp + 0.1 * torch.randn(b, t, device=device)
    adv = torch.randn(b, device=device)
    mask = torch.ones(b, t, device=device, dtype=torch.int64)
    mask[:, t - t // 8:] = 0  # some padding at the end of every sequence
    x = logits.clone().requires_grad_(True)
    # Ours in place needs non-leaf logits, as an lm_head output is (a leaf takes the out-of-place path). Providers
    # that write the gradient in place leave gradients where the logits were; timing is unaffected, since with
    # kl_coef != 0 every valid token has a non-zero gradient and no row is skipped. Ours refuses to read its own
    # gradient back as logits, so each timed call first marks the buffer as rewritten (a version bump, no work).
    x_out = x.detach().clone().requires_grad_(True).clone()

    def reuse(t):
        torch.autograd.graph.increment_version(t)
        return t
    adv_tok = adv.unsqueeze(-1).expand(b, t)

    def reference_step():
        loss, _ = reference.fused_ppo_loss(x, labels, old, adv_tok, mask, ref_logp=ref_logp, **GRPO)
        return torch.autograd.grad(loss, x)

    bench.measure(op, "torch-eager", shape, dname, reference_step, bytes_moved=loss_bytes, baseline=True)
    if compile_ok:
        def make_compiled():
            loss_fn = _compiled(lambda z: reference.fused_ppo_loss(z, labels, old, adv_tok, mask, ref_logp=ref_logp,
                                                                   **GRPO)[0])
            return lambda: torch.autograd.grad(loss_fn(x), x)

        _measure_compiled(bench, op, shape, dname, make_compiled, bytes_moved=loss_bytes)
    if liger_grpo is not None:
        xl = torch.cat([logits, logits[:, :1]], dim=1).requires_grad_(True)

        def liger_step():  # loss_type="grpo": per-sequence token mean, then the batch mean (= seq-mean-token-mean)
            loss, _ = liger_grpo(xl, old, ref_logp, labels, adv, mask, temperature=GRPO["temperature"],
                                 beta=GRPO["kl_coef"], eps_low=GRPO["clip_low"], eps_high=GRPO["clip_high"],
                                 inplace=True, loss_type="grpo", reduce=True)
            return torch.autograd.grad(loss, xl)

        bench.measure(op, "liger (inplace)", shape, dname, liger_step, bytes_moved=loss_bytes)
        del xl
    if triton_ok:
        for inplace in (True, False):
            def ours_step(inplace=inplace):
                loss, _ = ops.fused_ppo_loss(reuse(x_out), labels, old, adv, mask, ref_logp=ref_logp,
                                             inplace_grad=inplace, **GRPO)
                return torch.autograd.grad(loss, x_out)

            bench.measure(op, f"rlhf_fast ops (inplace={inplace})", shape, dname, ours_step, bytes_moved=loss_bytes)

        def kernel_step():
            loss, _ = fused_kernels.fused_ppo_loss(reuse(x_out), labels, old, adv_tok, mask, ref_logp=ref_logp,
                                                   inplace_grad=True, **GRPO)
            return torch.autograd.grad(loss, x_out)

        bench.measure(op, "rlhf_fast kernel (inplace)", shape, dname, kernel_step, bytes_moved=loss_bytes)
