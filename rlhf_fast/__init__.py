"""rlhf_fast: fast, memory-lean RLHF (fused Triton kernels, a C++ rollout batcher, thin trainers).

``rlhf_fast.ops`` holds the functional kernels API, ``rlhf_fast.batching`` the rollout batcher; heavier parts (trainers, which import transformers) are
loaded on first use so that ``import rlhf_fast`` stays cheap.
"""
from . import batching, ops
from ._version import __version__

_TRAINER_EXPORTS = ("DPOConfig", "DPOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer")

__all__ = ["__version__", "batching", "ops", *_TRAINER_EXPORTS]


def __getattr__(name):
    # Trainers import transformers: load them on first access only.
    if name in _TRAINER_EXPORTS:
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")
