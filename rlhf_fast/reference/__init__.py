"""Pure-PyTorch implementations of every op: the CPU fallback and the oracle the kernels are tested against.

Signatures match the kernels': per-token ops take ``[N, V]`` logits and ``[N]`` labels; losses take ``[B, T]``
per-token tensors. ``rlhf_fast.ops`` validates input and brings it to these layouts.
"""
from .advantages import gae, masked_whiten
from .dpo import DPO_LOSS_TYPES, dpo_loss
from .kl import KL_ESTIMATORS, token_kl
from .linear import fused_linear_ppo_loss, linear_logprobs
from .logprobs import logprobs_and_entropy, selective_log_softmax
from .losses import AGG_MODES, aggregate, fused_ppo_loss, policy_loss_terms, ppo_policy_loss, ppo_value_loss

__all__ = [
    "AGG_MODES",
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "aggregate",
    "dpo_loss",
    "fused_linear_ppo_loss",
    "fused_ppo_loss",
    "gae",
    "linear_logprobs",
    "logprobs_and_entropy",
    "masked_whiten",
    "policy_loss_terms",
    "ppo_policy_loss",
    "ppo_value_loss",
    "selective_log_softmax",
    "token_kl",
]
