"""The rollout batcher: balanced partitions, token-budgeted micro-batch plans, packing and padding.

Every function runs on the C++ module ``rlhf_fast._C`` when it was built and on a pure-Python fallback
otherwise; both give identical results. Force one with ``backend="cpp" | "python"``, or set
``RLHF_FAST_BACKEND=torch`` to run every reference path (the Python fallback here).
"""
from .packing import PackedBatch, PaddedBatch, pack, pad, restore_order, unpack, unpad
from .partition import balanced_partition
from .plan import MicroBatchPlan, plan_micro_batches

__all__ = [
    "MicroBatchPlan",
    "PackedBatch",
    "PaddedBatch",
    "balanced_partition",
    "pack",
    "pad",
    "plan_micro_batches",
    "restore_order",
    "unpack",
    "unpad",
]
