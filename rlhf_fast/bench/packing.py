"""Padding-free training: the trainers' packed micro-batches against right-padded ones, on the same rollouts.

A random-init Llama scores and trains on rollouts with RLHF's long-tailed lengths: prompts uniform in 16..256
tokens, responses log-normal with median 128 (sigma 1) cut at 2,048. The batcher plans token-budgeted
micro-batches at several budgets (``max_tokens_per_micro_batch``); each micro-batch runs either packed (one row,
per-sequence attention: ``rlhf_fast.packed_attention``) or padded to its longest row (SDPA with a mask), exactly
as ``rlhf_fast.trainers`` run them:

- ``packing_scoring``: no-grad log-probs of every micro-batch (the old / reference log-prob pass);
- ``packing_update``: forward, ``fused_ppo_loss`` and backward of every micro-batch (one PPO pass).

Rows: median ms over the whole batch, ``tokens_per_s`` (real tokens, not padding), peak extra memory on CUDA,
and ``max_abs_diff`` of the packed result against the padded one (log-probs; loss and gradients), which must be
at rounding level. The padded layout is the baseline: speedup = padded_ms / packed_ms.
CPU preset: 2 layers, width 128, V=2048, 16 rollouts; GPU preset: 8 layers, width 1024, V=32,000, 256 rollouts.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..trainers.packed import MicroBatch, token_logprobs
from ..trainers.rollout import plan_micro_batches


def rollout_lengths(count: int, rng) -> tuple[list[int], list[int]]:
    prompts = rng.integers(16, 257, size=count)
    responses = np.minimum(np.round(rng.lognormal(np.log(128), 1.0, size=count)), 2048).astype(int).clip(min=1)
    return prompts.tolist(), responses.tolist()


def _model(device, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..packed_attention import enable_packed_attention

    if device.type == "cuda" and not quick:
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
        dtype = torch.bfloat16
    else:
        config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        dtype = torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    enable_packed_attention(model)  # padded batches still run SDPA with their mask
    return model, dtype


def run(bench) -> None:
    """On CPU with one torch thread (the trainers' demo setting; shared cores make more threads noisy)."""
    threads = torch.get_num_threads()
    if not bench.on_cuda:
        torch.set_num_threads(1)
    try:
        _run(bench)
    finally:
        torch.set_num_threads(threads)


def _run(bench) -> None:
    device = bench.device
    model, dtype = _model(device, bench.quick)
    rng = np.random.default_rng(0)
    count = 8 if bench.quick else (256 if bench.on_cuda else 16)
    budgets = [2048] if bench.quick else ([8192, 16384, 32768] if bench.on_cuda else [2048, 4096, 8192])
    prompt_lens, response_lens = rollout_lengths(count, rng)
    if bench.quick:
        response_lens = [min(r, 256) for r in response_lens]
    vocab = model.config.vocab_size
    sequences = [rng.integers(0, vocab, size=p + r).tolist() for p, r in zip(prompt_lens, response_lens)]
    lengths = [len(s) for s in sequences]
    tokens = sum(lengths)
    width = max(lengths) - 1
    mask = torch.zeros(count, width, device=device)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        mask[row, p - 1:p - 1 + r] = 1.0
    old_logp = -torch.rand(count, width, device=device) * 3 * mask
    advantages = torch.randn(count, width, device=device) * mask
    dtype_name = str(dtype).replace("torch.", "")
    print(f"  {count} rollouts, {tokens} tokens, longest {max(lengths)}; mean padded width per micro-batch below")

    for budget in budgets:
        plan = [mb for mb in plan_micro_batches(lengths, budget) if mb]
        batches = {packed: [MicroBatch(sequences, mb, packed=packed, pad_id=0, device=device) for mb in plan]
                   for packed in (False, True)}
        positions = sum(b.input_ids.numel() for b in batches[False])
        shape = f"n={count} budget={budget} pad={positions / tokens:.2f}x"

        def score(packed):
            with torch.no_grad():
                return [b.to_rows(token_logprobs(model, b, temperature=1.0), width) for b in batches[packed]]

        def update(packed):
            model.zero_grad(set_to_none=True)
            losses = []
            for b in batches[packed]:
                logits = model(**b.model_inputs()).logits
                loss, _ = ops.fused_ppo_loss(logits, b.labels, b.take(old_logp), b.take(advantages), b.take(mask),
                                             num_tokens=float(mask.sum()), cu_seqlens=b.cu_seqlens)
                loss.backward()
                losses.append(loss.detach())
            return torch.stack(losses).sum()

        results = {}
        for packed in (False, True):
            provider = "packed" if packed else "padded"
            results[packed] = (torch.cat(score(packed)), float(update(packed)),
                               [p.grad.detach().float().clone() for p in model.parameters()])
            for op, fn in (("packing_scoring", score), ("packing_update", update)):
                ms = bench.measure(op, provider, shape, dtype_name, lambda f=fn, p=packed: f(p), baseline=not packed,
                                   rep=5 if not bench.on_cuda else None)
                if ms:
                    bench._add(op, provider, shape, dtype_name, "tokens_per_s", tokens / (ms * 1e-3))
        logp, loss, grads = results[False]
        plogp, ploss, pgrads = results[True]
        order = torch.cat([torch.tensor(mb) for mb in plan])
        rows_mask = mask[order] != 0
        logp_diff = float((plogp - logp)[rows_mask].abs().max())
        grad_diff = max(float((g - pg).abs().max() / g.abs().max().clamp(min=1e-30)) for g, pg in zip(grads, pgrads))
        bench._add("packing_scoring", "packed", shape, dtype_name, "max_abs_diff", logp_diff)
        bench._add("packing_update", "packed", shape, dtype_name, "max_abs_diff", abs(ploss - loss))
        bench._add("packing_update", "packed", shape, dtype_name, "max_rel_grad_diff", grad_diff)
        print(f"  {shape}: packed - padded: log-probs {logp_diff:.2e}, loss {abs(ploss - loss):.2e}, "
              f"gradients (relative to each tensor's largest entry) {grad_diff:.2e}")
