"""GAE and masked whitening: the per-timestep loop every RLHF library starts from, the C++ CPU sweep, the Triton kernel.

Providers for ``gae`` (shapes 256x1024 and 64x4096; quick mode 32x256):
- ``torch-loop``: ``rlhf_fast.reference.gae``, the per-timestep Python loop (the baseline), on the bench device;
- ``cpp-cpu``: ``rlhf_fast.ops.gae`` on CPU tensors, which runs ``rlhf_fast._C.gae`` (only on CPU runs);
- ``triton``: ``rlhf_fast.ops.gae`` on CUDA tensors, which dispatches to ``rlhf_fast.kernels.advantages.gae``.
``torch.compile`` of the loop is left out by default: Dynamo unrolls the loop and Inductor's compile time grows with
T (measured on a 2-core CPU: 40 s for T=64, 75 s for T=128, so about ten minutes at T=1024). Set
``RLHF_FAST_BENCH_COMPILE_GAE=1`` to include it anyway (not in quick mode).

``masked_whiten`` (256x1024 and 64x4096): eager reference (baseline), ``torch.compile`` of it (not in quick mode),
Triton on CUDA.
"""
from __future__ import annotations

import os

import torch

from .. import ops
from .. import reference as R
from .._dispatch import native_module, requested_backend, resolve
from .harness import Bench

GAE_BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4  # rewards, values, bool mask in; advantages, returns out (float32)


def _inputs(rows, steps, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, steps, generator=g)
    values = torch.randn(rows, steps, generator=g)
    mask = torch.rand(rows, steps, generator=g) > 0.2
    return rewards.to(device), values.to(device), mask.to(device)


def _check_triton_dispatch(name: str, device) -> None:
    from ..kernels import KERNELS

    if resolve(name, device) is not KERNELS.get(name):
        raise RuntimeError(f"{name}: rlhf_fast.ops does not dispatch to the Triton kernel on {device}")


def run(bench: Bench) -> None:
    shapes = [(32, 256)] if bench.quick else [(256, 1024), (64, 4096)]
    forced = requested_backend()
    for rows, steps in shapes:
        shape = f"{rows}x{steps}"
        bytes_moved = rows * steps * GAE_BYTES_PER_TOKEN
        rewards, values, mask = _inputs(rows, steps, bench.device)
        kw = dict(gamma=1.0, lam=0.95)
        bench.measure("gae", "torch-loop", shape, "float32", lambda: R.gae(rewards, values, mask, **kw),
                      bytes_moved=bytes_moved, baseline=True, rep=3 if bench.on_cuda else None)
        if not bench.quick and os.environ.get("RLHF_FAST_BENCH_COMPILE_GAE") == "1":
            compiled = torch.compile(R.gae, dynamic=False)
            bench.measure("gae", "torch-compile", shape, "float32", lambda: compiled(rewards, values, mask, **kw),
                          bytes_moved=bytes_moved)
        if not bench.on_cuda and native_module() is not None and forced is None:
            bench.measure("gae", "cpp-cpu", shape, "float32", lambda: ops.gae(rewards, values, mask, **kw),
                          bytes_moved=bytes_moved)
        if bench.on_cuda and forced != "torch":
            _check_triton_dispatch("gae", bench.device)
            bench.measure("gae", "triton", shape, "float32", lambda: ops.gae(rewards, values, mask, **kw),
                          bytes_moved=bytes_moved)

        x = torch.randn(rows, steps, device=bench.device)
        whiten_bytes = rows * steps * (4 + 1) * 2 + rows * steps * 4  # x and mask read twice, y written
        bench.measure("masked_whiten", "torch-eager", shape, "float32", lambda: R.masked_whiten(x, mask),
                      bytes_moved=whiten_bytes, baseline=True)
        if not bench.quick:
            compiled_whiten = torch.compile(R.masked_whiten, dynamic=False)
            bench.measure("masked_whiten", "torch-compile", shape, "float32", lambda: compiled_whiten(x, mask),
                          bytes_moved=whiten_bytes)
        if bench.on_cuda and forced != "torch":
            _check_triton_dispatch("masked_whiten", bench.device)
            bench.measure("masked_whiten", "triton", shape, "float32", lambda: ops.masked_whiten(x, mask),
                          bytes_moved=whiten_bytes)
