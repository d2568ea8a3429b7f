"""Rollouts: sampling with ``generate``, and no-grad per-token passes in token-budgeted micro-batches.

Sequences stay variable-length lists until a forward pass needs them: the batcher
(``rlhf_fast.batching.plan_micro_batches``) groups them into balanced micro-batches of at most ``max_tokens``
tokens, each micro-batch is right-padded to its own longest row, and the per-token results are written back
into one ``[B, T_max - 1]`` tensor in the original order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import batching, ops
from .data import pad_left, pad_right


def plan_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches (lists of indices) from the batcher; ``max_tokens`` bounds the real (unpadded) tokens
    of each, so a right-padded micro-batch may hold up to ``rows x longest`` positions."""
    return [mb for mb in batching.plan_micro_batches(lengths, max_tokens, num_ranks=1)[0] if mb]


@dataclass
class Generation:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # up to and including the first stop token
    stopped: list[bool]  # whether the response ended with the stop token
    # the rollout engine's log-prob of each response token (None: the engine is the trainer's model)
    logprobs: Optional[list[list[float]]] = None


def generation_config(*, pad_id: int, eos_id: int | None, max_new_tokens: int, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: int = 0, do_sample: bool = True):
    """A ``GenerationConfig`` with every setting that shapes the sampled distribution or the stopping set.

    ``model.generate`` fills each field left ``None`` from the model's own ``generation_config`` (checkpoints ship
    ``repetition_penalty``, ``no_repeat_ngram_size``, ``top_k``, ``min_new_tokens``, an EOS...), which would make
    the rollouts come from another distribution than the log-probs the trainer computes (softmax of the logits at
    ``temperature``, after ``top_p`` / ``top_k`` only). So every such field is set here: neutral values for the
    processors, ``top_k=0`` (off) unless configured, ``eos_token_id=[]`` (no stop token at all) when ``eos_id`` is
    None. Fields whose only "off" value is ``None`` (``suppress_tokens``, ``bad_words_ids``, ``forced_*``,
    ``min_p``...) are kept away by ``generate``, which hides the model's ``generation_config`` during the call.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        # greedy: the sampling fields are unused (and transformers warns when they are set)
        do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        top_k=top_k if do_sample else None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, length_penalty=1.0, min_new_tokens=0, max_new_tokens=max_new_tokens,
        num_beams=1, num_return_sequences=1, renormalize_logits=False, remove_invalid_values=False,
        guidance_scale=1.0, diversity_penalty=0.0, eos_token_id=[eos_id] if eos_id is not None else [],
        pad_token_id=pad_id, use_cache=True, output_scores=False, output_logits=False, return_dict_in_generate=False,
    )


@contextlib.contextmanager
def _without_model_generation_config(model):
    """Hide the model's ``generation_config`` (a blank one) for the duration of one ``generate`` call."""
    from transformers import GenerationConfig

    from ..modeling import FusedLinearLM

    target = model.lm if isinstance(model, FusedLinearLM) else model  # those generate with the model inside
    saved = getattr(target, "generation_config", None)
    if saved is None:
        yield
        return
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], *, pad_id: int, eos_id: int | None, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True,
             batch_size: int = 256, synced_gpus: bool = False) -> Generation:
    """Sample one response per prompt with ``model.generate`` (left-padded prompts, KV cache), in eval mode.

    Only these settings apply (``generation_config`` above): the model's own generation defaults are ignored, so
    ``eos_id=None`` means no stop token (always ``max_new_tokens`` tokens) even when the model has an EOS. A
    response is cut after its first ``eos_id``; what ``generate`` writes after it (padding of finished rows) is
    never part of the response. ``synced_gpus``: keep decoding until every rank is done (FSDP2 gathers
    parameters in each step)."""
    device = next(model.parameters()).device
    config = generation_config(pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, do_sample=do_sample)
    was_training = model.training
    model.eval()
    responses, stopped = [], []
    try:
        with _without_model_generation_config(model):
            for start in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[start:start + batch_size]
                ids, attention = pad_left(chunk, pad_id)
                out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                     generation_config=config, synced_gpus=synced_gpus)
                for row in out[:, ids.shape[1]:].tolist():
                    if eos_id is not None and eos_id in row:
                        row = row[: row.index(eos_id) + 1]
                        stopped.append(True)
                    else:  # only max_new_tokens stops a row without eos_id: nothing was padded
                        stopped.append(False)
                    responses.append(row)
    finally:
        model.train(was_training)
    return Generation(prompt_ids=list(prompt_ids), response_ids=responses, stopped=stopped)


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
