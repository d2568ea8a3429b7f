"""The public functional API (docs/API.md, section ``rlhf_fast.ops``).

Each op validates its input with errors that name the argument, then dispatches: Triton kernels for CUDA
tensors, the PyTorch reference (or C++) otherwise. ``RLHF_FAST_BACKEND=torch|triton`` overrides the choice.
"""
from .advantages import gae, masked_whiten
from .dpo import dpo_loss
from .kl import token_kl
from .linear import fused_linear_ppo_loss, linear_logprobs
from .logprobs import logprobs_and_entropy, selective_log_softmax
from .losses import fused_ppo_loss, ppo_policy_loss, ppo_value_loss

__all__ = [
    "dpo_loss",
    "fused_linear_ppo_loss",
    "fused_ppo_loss",
    "gae",
    "linear_logprobs",
    "logprobs_and_entropy",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "selective_log_softmax",
    "token_kl",
]
