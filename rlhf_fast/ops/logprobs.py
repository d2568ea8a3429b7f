"""Public log-prob / entropy ops on logits."""
from __future__ import annotations

import torch

from .. import _validation as v
from .._dispatch import resolve


def check_logits_and_labels(logits, labels) -> int:
    v.check_float("logits", logits)
    v.check_min_ndim("logits", logits, 2, "a tensor [*, V] with a vocabulary dimension")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits: expected a non-empty vocabulary dimension, got V = 0")
    v.check_tensor("labels", labels)
    v.check_shape("labels", labels, logits.shape[:-1], "logits without its last dimension")
    v.check_same_device({"logits": logits, "labels": labels})
    v.check_labels("labels", labels, vocab)
    return vocab


def rows_time_vocab(logits: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` and ``[R, T, V]`` pass as they are (a sliced ``logits[:, :-1]`` is not copied: the kernels take
    its strides); more leading dimensions fold into ``R``."""
    if logits.dim() <= 3:
        return logits
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[labels]``: ``logits[*, V]``, ``labels[*]`` -> float32 ``[*]``.

    Differentiable with respect to ``logits``. The Triton path never makes a float32 copy of ``logits``.
    """
    check_logits_and_labels(logits, labels)
    temperature = v.check_number("temperature", temperature, greater_than=0.0)
    impl = resolve("selective_log_softmax", logits.device)
    logp = impl(rows_time_vocab(logits), labels.reshape(-1), temperature=temperature)
    return logp.view(labels.shape)


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label log-prob and entropy ``-sum p log p`` of ``softmax(logits / temperature)``, both float32 ``[*]``."""
    check_logits_and_labels(logits, labels)
    temperature = v.check_number("temperature", temperature, greater_than=0.0)
    impl = resolve("logprobs_and_entropy", logits.device)
    logp, entropy = impl(rows_time_vocab(logits), labels.reshape(-1), temperature=temperature)
    return logp.view(labels.shape), entropy.view(labels.shape)
