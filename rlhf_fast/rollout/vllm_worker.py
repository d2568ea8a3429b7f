"""Runs inside vLLM's worker process (``worker_extension_cls``): receives the policy's weights in memory.

The weights travel as one safetensors byte string through ``LLM.collective_rpc`` (tensors sent directly arrive as
lists in vLLM's multi-process mode) and go through the worker's ``reload_weights``, which also redoes the
backend's post-load processing (the CPU backend repacks its linear weights; ``model.load_weights`` alone leaves
them stale there).
"""
from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class; methods are called by name through ``collective_rpc``."""

    def rlhf_fast_load_weights(self, payload: bytes) -> int:
        """Load a safetensors byte string of Hugging Face parameter names; returns the number of tensors."""
        from safetensors.torch import load

        weights = load(payload)
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)
