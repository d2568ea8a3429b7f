"""rlhf_fast: fast, memory-lean RLHF (fused Triton kernels, a C++ rollout batcher, thin trainers).

``rlhf_fast.ops`` holds the functional kernels API; heavier parts (trainers, which import transformers) are
loaded on first use so that ``import rlhf_fast`` stays cheap.
"""
from . import ops
from ._version import __version__

__all__ = ["__version__", "ops"]
