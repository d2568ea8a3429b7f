"""Sampling with ``model.generate``: one response per prompt, under exactly the configured sampling settings.

The ``hf`` rollout engine calls ``generate``; ``Generation`` is what every engine returns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


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
                ids, attention = _pad_left(chunk, pad_id)
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


def _pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids[B, T]`` and ``attention_mask[B, T]`` (the layout ``generate`` wants)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask
