"""The eager PyTorch reference beside ``torch.compile`` of itself: the baseline every kernel must beat.

Quick mode uses CPU-sized shapes and compiles a single op (Inductor compiles take seconds each on CPU).
"""
from __future__ import annotations

import torch

from .. import reference as R
from .harness import Bench


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _policy_value_step(logp, old, adv, values, old_values, returns, mask):
    policy, _ = R.ppo_policy_loss(logp, old, adv, mask)
    value, _ = R.ppo_value_loss(values, old_values, returns, mask)
    (policy + value).backward()
    return policy


def run(bench: Bench) -> None:
    device = bench.device
    rows, steps = (8, 256) if bench.quick else (64, 2048)
    shape = f"{rows}x{steps}"
    torch.manual_seed(0)

    logp = torch.randn(rows, steps, device=device) - 1
    ref = torch.randn(rows, steps, device=device) - 1
    kl_bytes = 3 * logp.numel() * 4
    eager_kl = lambda: R.token_kl(logp, ref, estimator="k3")  # noqa: E731
    bench.measure("token_kl", "torch-eager", shape, "float32", eager_kl, bytes_moved=kl_bytes, baseline=True)
    compiled_kl = _compiled(R.token_kl)
    bench.measure("token_kl", "torch-compile", shape, "float32",
                  lambda: compiled_kl(logp, ref, estimator="k3"), bytes_moved=kl_bytes)

    mask = torch.rand(rows, steps, device=device) > 0.2
    bench.measure("masked_whiten", "torch-eager", shape, "float32", lambda: R.masked_whiten(logp, mask),
                  bytes_moved=logp.numel() * 9, baseline=True)

    leaf = logp.clone().requires_grad_()
    values = torch.randn(rows, steps, device=device, requires_grad=True)
    args = (leaf, ref, torch.randn(rows, steps, device=device), values, values.detach() + 0.1,
            torch.randn(rows, steps, device=device), mask)
    bench.measure("ppo_policy+value_loss fwd+bwd", "torch-eager", shape, "float32",
                  lambda: _policy_value_step(*args), baseline=True)
    if not bench.quick:
        compiled_step = _compiled(_policy_value_step)
        bench.measure("ppo_policy+value_loss fwd+bwd", "torch-compile", shape, "float32",
                      lambda: compiled_step(*args))
        vocab = 32000
        logits = torch.randn(rows * 64, vocab, device=device, dtype=torch.bfloat16)
        labels = torch.randint(0, vocab, (rows * 64,), device=device)
        lp_shape, lp_bytes = f"{rows * 64}x{vocab}", logits.numel() * 2
        bench.measure("selective_log_softmax", "torch-eager", lp_shape, "bfloat16",
                      lambda: R.selective_log_softmax(logits, labels), bytes_moved=lp_bytes, baseline=True)
        compiled_lp = _compiled(R.selective_log_softmax)
        bench.measure("selective_log_softmax", "torch-compile", lp_shape, "bfloat16",
                      lambda: compiled_lp(logits, labels), bytes_moved=lp_bytes)
