"""Rollout scoring: no-grad per-token passes over sampled sequences in token-budgeted micro-batches.

Sequences stay variable-length lists until a forward pass needs them: the batcher
(``rlhf_fast.batching.plan_micro_batches``) groups them into balanced micro-batches of at most ``max_tokens``
tokens, each micro-batch is right-padded to its own longest row, and the per-token results are written back
into one ``[B, T_max - 1]`` tensor in the original order.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import batching, ops
from .data import pad_right


def plan_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches (lists of indices) from the batcher; ``max_tokens`` bounds the real (unpadded) tokens
    of each, so a right-padded micro-batch may hold up to ``rows x longest`` positions."""
    return [mb for mb in batching.plan_micro_batches(lengths, max_tokens, num_ranks=1)[0] if mb]


def response_mask(prompt_lens: list[int], response_lens: list[int], width: int) -> torch.Tensor:
    """``[B, width]`` mask over label positions (label t+1 is predicted at t): 1 on the response tokens.

    With an empty prompt (``p = 0``) the first response token has no position that predicts it, so it is not
    scored: the mask covers the ``r - 1`` labels at positions ``0 .. r - 2``."""
    mask = torch.zeros((len(prompt_lens), width), dtype=torch.float32)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        start = max(p - 1, 0)
        mask[row, start:p - 1 + r] = 1.0
    return mask


@torch.no_grad()
def per_token_in_micro_batches(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                               sequences: list[list[int]], *, pad_id: int, max_tokens: int,
                               device: torch.device, per_sequence: bool = False,
                               micro_batches: list[list[int]] | None = None, outputs: int = 1):
    """Run ``fn(input_ids, attention_mask)`` over token-budgeted micro-batches.

    ``fn`` returns ``[b, t - 1]`` per-token results (``[b]`` with ``per_sequence=True``); the output is
    ``[B, T_max - 1]`` float32 on ``device``, zero beyond each row's length (``[B]`` with ``per_sequence=True``).
    With ``outputs=n > 1``, ``fn`` returns a tuple of ``n`` such results (one forward, several per-token
    quantities: log-probs and values of a policy with a value head) and the output is a tuple of ``n`` tensors.
    ``micro_batches`` (default: the batcher's plan of all sequences) may cover only some rows, as one rank's
    share of a distributed plan does; rows outside it stay zero. An empty micro-batch still calls ``fn`` once,
    on the first sequence, and drops the result: under FSDP2 every rank must run the same number of forwards.
    """
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    shape = (len(sequences),) if per_sequence else (len(sequences), width - 1)
    outs = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(outputs)]
    if micro_batches is None:
        micro_batches = plan_micro_batches(lengths, max_tokens)
    for micro in micro_batches:
        if not micro:
            ids, attention = pad_right(sequences[:1], pad_id)
            fn(ids.to(device), attention.to(device))
            continue
        ids, attention = pad_right([sequences[i] for i in micro], pad_id)
        results = fn(ids.to(device), attention.to(device))
        if outputs == 1:
            results = (results,)
        elif not isinstance(results, (tuple, list)) or len(results) != outputs:
            raise ValueError(f"per_token_in_micro_batches: fn must return {outputs} tensors with outputs={outputs}")
        index = torch.tensor(micro, device=device)
        for out, result in zip(outs, results):
            result = result.float()
            if per_sequence:
                out[index] = result
            else:
                out[index, : result.shape[1]] = result
    return outs[0] if outputs == 1 else tuple(outs)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float,
                   from_hidden: bool = False) -> torch.Tensor:
    """``[b, t - 1]`` log p(input_ids[:, 1:]) under ``model`` at ``temperature`` (through rlhf_fast.ops).

    ``from_hidden``: fused lm_head + log-softmax, never building the logits. ``model`` is then a
    ``FusedLinearLM`` (bare, or inside DDP / FSDP2: called through its forward, so FSDP2 gathers the head and
    the embedding) or a bare causal LM (one process only)."""
    if from_hidden:
        from ..modeling import FusedLinearLM, sequence_logprobs
        from .distributed import unwrap

        if isinstance(unwrap(model), FusedLinearLM):
            return model(input_ids, attention_mask, temperature=temperature)
        return sequence_logprobs(model, input_ids, attention_mask, temperature=temperature)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return ops.selective_log_softmax(logits, input_ids[:, 1:], temperature=temperature)
