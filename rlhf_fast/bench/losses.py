"""PPO policy + value losses, forward + backward, at 64x2048 (quick mode 8x256).

Providers: the eager reference (baseline), ``torch.compile`` of the same step (not in quick mode), and
``rlhf_fast.ops`` on CUDA, which dispatches to the Triton kernels. Each step computes both losses with their
statistics and back-propagates their sum, as a PPO update does.
"""
from __future__ import annotations

import torch

from .. import ops
from .. import reference as R
from .._dispatch import requested_backend, resolve
from .harness import Bench

OP = "ppo_policy+value fwd+bwd"


def _step(policy_fn, value_fn):
    def step(logp, old, adv, values, old_values, returns, mask):
        policy, pstats = policy_fn(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
        value, vstats = value_fn(values, old_values, returns, mask, clip=0.2)
        (policy + value).backward()
        return policy, value, pstats, vstats

    return step


def _inputs(rows, steps, device):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(rows, steps, generator=g) - 1.0
    logp = (old + 0.2 * torch.randn(rows, steps, generator=g)).requires_grad_()
    adv = torch.randn(rows, steps, generator=g)
    values = torch.randn(rows, steps, generator=g)
    old_values = values + 0.1 * torch.randn(rows, steps, generator=g)
    returns = torch.randn(rows, steps, generator=g)
    mask = torch.rand(rows, steps, generator=g) > 0.2
    tensors = [t.to(device) for t in (logp.detach(), old, adv, values, old_values, returns, mask)]
    tensors[0].requires_grad_()
    tensors[3].requires_grad_()
    return tensors


def run(bench: Bench) -> None:
    rows, steps = (8, 256) if bench.quick else (64, 2048)
    shape = f"{rows}x{steps}"
    args = _inputs(rows, steps, bench.device)
    # Policy: logp, old_logp, advantages in, mask in, grad out; value: values, old, returns in, mask, grad out.
    bytes_moved = rows * steps * ((4 * 4 + 1) + (4 * 4 + 1))
    bench.measure(OP, "torch-eager", shape, "float32", lambda: _step(R.ppo_policy_loss, R.ppo_value_loss)(*args),
                  bytes_moved=bytes_moved, baseline=True)
    if not bench.quick:
        compiled = torch.compile(_step(R.ppo_policy_loss, R.ppo_value_loss), dynamic=False)
        bench.measure(OP, "torch-compile", shape, "float32", lambda: compiled(*args), bytes_moved=bytes_moved)
    if bench.on_cuda and requested_backend() != "torch":
        from ..kernels import KERNELS

        for name in ("ppo_policy_loss", "ppo_value_loss"):
            if resolve(name, bench.device) is not KERNELS.get(name):
                raise RuntimeError(f"{name}: rlhf_fast.ops does not dispatch to the Triton kernel")
        bench.measure(OP, "triton", shape, "float32", lambda: _step(ops.ppo_policy_loss, ops.ppo_value_loss)(*args),
                      bytes_moved=bytes_moved)
