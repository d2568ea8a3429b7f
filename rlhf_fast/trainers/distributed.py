"""PyTorch's own data parallelism for the trainers: torchrun's environment, DDP or FSDP2, small collectives.

Nothing here is an engine of its own. ``setup`` joins the process group that ``torchrun`` describes
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` or a c10d rendezvous; NCCL on CUDA,
gloo on CPU), ``Distributed.wrap`` hands a module to ``DistributedDataParallel`` or ``fully_shard`` (FSDP2),
and the rest are thin helpers around ``torch.distributed`` collectives on host-sized data (counts, token lists,
per-token tensors of one rollout). Every helper is a no-op in a single process, so the trainers have one code
path. See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .._validation import check_option

STRATEGIES = ("auto", "none", "ddp", "fsdp2")


@dataclass
class Distributed:
    """Where this process stands: its rank, the world, the device and how models are wrapped."""

    strategy: str  # resolved: "none", "ddp" or "fsdp2"
    rank: int
    world_size: int
    device: torch.device
    mixed_precision: bool = False  # FSDP2 bf16 parameters / fp32 gradient reduction (CUDA only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP2 average gradients over ranks; losses normalised by *global* counts are multiplied by
        this factor so that the averaged gradient is the gradient of the global-batch loss."""
        return float(self.world_size) if self.strategy in ("ddp", "fsdp2") else 1.0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    # ---- wrapping -------------------------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module, *, trainable: bool = True) -> torch.nn.Module:
        """``module`` on this rank's device, as DDP (trainable, ``ddp``), FSDP2 (``fsdp2``) or itself.

        Frozen modules stay plain replicas under DDP (nothing to synchronise); under FSDP2 they are sharded too,
        since the reference and reward models are exactly what does not fit one GPU.
        """
        if self.strategy == "fsdp2":
            return self._fully_shard(module)  # moves the shards to the device itself
        module = module.to(self.device)
        if self.strategy == "ddp" and trainable:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # no buffer sync in forward: the models' buffers are constants (rotary tables), and a sync would add a
            # collective to every forward, including no-grad passes outside the matched training steps
            return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
        return module

    def _fully_shard(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.mixed_precision else MixedPrecisionPolicy())
        # one FSDP unit per transformer block (the classes transformers itself never splits), then the root,
        # so that only one block's full parameters are alive at a time
        block_names = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
        for block in [m for m in module.modules() if type(m).__name__ in block_names]:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # the root's inputs are token ids and masks, and for FusedLinearLM the loss inputs (old / reference
        # log-probs, advantages): those must stay fp32, so the root does not cast its inputs to param_dtype
        root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                           cast_forward_inputs=False)
        root = fully_shard(module, mesh=mesh, mp_policy=root_policy)
        # methods other than forward that use the root's parameters (FusedLinearLM.generate: the head and the
        # embedding, gathered once for the whole decoding loop)
        for name in getattr(module, "_fsdp_forward_methods", ()):
            register_fsdp_forward_method(root, name)
        return root

    def gradient_sync(self, modules: Iterable[torch.nn.Module], sync: bool):
        """Skip the gradient all-reduce / reduce-scatter of all but the last micro-batch of an optimizer step."""
        stack = contextlib.ExitStack()
        for module in modules:
            if hasattr(module, "no_sync") and not sync:  # DDP
                stack.enter_context(module.no_sync())
            elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
                module.set_requires_gradient_sync(sync)
        return stack

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
        """Global gradient norm (FSDP2 shards included) as a 0-d tensor, clipping to ``max_norm`` when given."""
        if self.strategy != "fsdp2":
            if max_norm:
                return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            return torch.norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # a DTensor holding this rank's partial norm: reduce it
            norm = norm.full_tensor()
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm

    # ---- collectives (no-ops in one process) ------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks, on ``tensor``'s device."""
        if self.world_size == 1:
            return tensor
        buffer = tensor.detach().to(self._comm_device, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(tensor.device)

    def sum_counts(self, *counts: float) -> list[float]:
        """Global sums of local counts (tokens, sequences), in float64 so integer counts stay exact."""
        return self.all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()

    def all_gather_objects(self, value) -> list:
        """``[value of rank 0, value of rank 1, ...]`` for small picklable values."""
        if self.world_size == 1:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, value, src: int = 0):
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src, device=self._comm_device)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shard(self, items: list) -> list:
        """This rank's contiguous block of ``items``; concatenating the blocks in rank order gives ``items``."""
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return items[start:start + size + (self.rank < extra)]


def setup(strategy: str = "auto", *, device: Optional[str] = None, bf16: bool = True) -> Distributed:
    """Join the process group described by torchrun's environment (or an existing one) and pick a strategy.

    ``strategy``: ``auto`` (DDP when the world has more than one process, else none), ``none``, ``ddp`` or
    ``fsdp2``. ``none`` in a multi-process world is refused: each process would train its own model.
    """
    check_option("distributed", strategy, STRATEGIES)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise ValueError(f"distributed: 'none' with WORLD_SIZE={world} would train {world} unrelated models; "
                         "use 'ddp' or 'fsdp2' (or 'auto')")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy != "none" and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun (or a hand-made launcher that sets the env:// variables)
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # one process asked for FSDP2 / DDP without torchrun: a world of one on an in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Distributed(strategy=strategy, rank=rank, world_size=world, device=device,
                       mixed_precision=bf16 and device.type == "cuda")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so its module is already the model)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module
