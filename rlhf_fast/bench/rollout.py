"""Rollout engines: ``hf`` (``model.generate``) against ``vllm``, on the same random-init Llama and prompts.

- ``generate``: one batch of fixed-length prompts, every row sampled to ``new`` tokens (no stop token), at each
  batch size of the preset; ``tokens_per_s`` counts the new tokens.
- ``ppo_step``: one PPO step (GAE with a value head, a reward function) of a trainer with each engine, split into
  ``generate_s`` (rollout, including the vllm weight push), ``score_s`` (no-grad passes) and ``train_s``
  (update), medians over the measured steps.

Presets: CPU (a 4-layer width-128 Llama, one torch thread, vLLM's default CPU binding, which gives its worker one
core on a 2-core machine), ``quick`` (smaller, for CI) and GPU (a Qwen2-0.5B-shaped model, bf16). vllm is measured
where it is importable (on CPU: the environment of scripts/setup_vllm_env.sh), and skipped with the reason
otherwise. The baseline is ``hf``.
"""
from __future__ import annotations

import statistics

import torch

from .harness import optional

PRESETS = {
    "quick": dict(vocab=512, hidden=64, layers=2, heads=2, kv_heads=2, prompt=16, new=8, batches=(8,), steps=1,
                  step_batch=8),
    "cpu": dict(vocab=4096, hidden=128, layers=4, heads=4, kv_heads=4, prompt=32, new=32, batches=(8, 64),
                steps=2, step_batch=64),
    # Qwen2-0.5B's shape: 24 layers, width 896, 14 query / 2 key-value heads of 64, vocabulary 151,936
    "gpu": dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, prompt=128, new=256,
                batches=(64, 256), steps=3, step_batch=64),
}


def _model(options: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=options["vocab"], hidden_size=options["hidden"],
                         intermediate_size=options.get("intermediate", options["hidden"] * 8 // 3),
                         num_hidden_layers=options["layers"], num_attention_heads=options["heads"],
                         num_key_value_heads=options["kv_heads"],
                         max_position_embeddings=options["prompt"] + options["new"] + 8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if device.type == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)
    return model.eval()


def _prompts(options: dict, batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(3, options["vocab"], (batch, options["prompt"]), generator=generator).tolist()


def _engines(options: dict, model, device):
    from ..rollout import make_engine

    engines = {"hf": make_engine("hf", model=model, pad_id=0)}
    max_len = options["prompt"] + options["new"]

    def start_vllm():
        from ..rollout.vllm_engine import import_vllm

        import_vllm()
        return make_engine("vllm", model=model, pad_id=0, device=device, max_model_len=max_len, seed=0,
                           gpu_memory_utilization=0.5)

    engine = optional("vllm engine", start_vllm)
    if engine is not None:
        engines["vllm"] = engine
    return engines


def run(bench) -> None:
    from ..rollout import SamplingSettings

    preset = "gpu" if bench.on_cuda else ("quick" if bench.quick else "cpu")
    options = PRESETS[preset]
    threads = torch.get_num_threads()
    if not bench.on_cuda:
        torch.set_num_threads(1)
    try:
        model = _model(options, bench.device)
        engines = _engines(options, model, bench.device)
        sampling = SamplingSettings(max_new_tokens=options["new"], temperature=1.0, eos_id=None)
        dtype = "bf16" if bench.on_cuda else "fp32"
        for batch in options["batches"]:
            prompts = _prompts(options, batch)
            shape = f"{preset} B={batch} prompt={options['prompt']} new={options['new']}"
            for name, engine in engines.items():
                ms = bench.measure("generate", name, shape, dtype, lambda e=engine: e.generate(prompts, sampling),
                                   baseline=name == "hf", rep=3 if not bench.quick else 1)
                if ms:
                    tokens_per_s = batch * options["new"] / (ms / 1e3)
                    bench._add("generate", name, shape, dtype, "tokens_per_s", tokens_per_s)
                    print(f"  {'':28s} {name:24s} {shape:24s} {tokens_per_s:10.0f} new tokens/s")
        for engine in engines.values():  # one vLLM engine at a time: each PPO trainer starts its own
            engine.close()
        for name in engines:
            _ppo_step(bench, name, options, preset, dtype)
    finally:
        torch.set_num_threads(threads)


def _ppo_step(bench, engine_name: str, options: dict, preset: str, dtype: str) -> None:
    """Median time split of PPO steps with ``engine_name`` rolling out (a fresh trainer: the engine follows it)."""
    import tempfile

    from ..trainers import PPOConfig, PPOTrainer

    class Tokenizer:  # random id prompts need no real tokenizer: ids in, ids out
        pad_token_id, bos_token_id, eos_token_id = 0, None, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(t) for t in text.split()]}

        def batch_decode(self, ids, skip_special_tokens=True):
            return [" ".join(map(str, row)) for row in ids]

    prompts = [{"prompt": " ".join(map(str, row))} for row in _prompts(options, options["step_batch"])]
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, max_steps=options["steps"] + 1, per_device_train_batch_size=len(prompts),
                         response_length=options["new"], temperature=1.0, stop_token=None, num_ppo_epochs=1,
                         num_mini_batches=1, critic="value_head", rollout_engine=engine_name,
                         max_length=options["prompt"], disable_tqdm=True, report_to=[], plot=False,
                         save_final=False, bf16=bench.on_cuda, seed=0)
        shape = f"{preset} B={len(prompts)} prompt={options['prompt']} new={options['new']}"

        def build():
            return PPOTrainer(args=args, processing_class=Tokenizer(), model=_model(options, bench.device),
                              reward_model=lambda p, c: [float(len(x)) for x in c], train_dataset=prompts)

        trainer = optional(f"ppo_step with {engine_name}", build)
        if trainer is None:
            return
        try:
            trainer.step()  # warm-up: the first rollout and update
            records = [trainer.step() for _ in range(options["steps"])]
        finally:
            trainer.close()
        split = {key: statistics.median(r[f"time_{key}_s"] for r in records) for key in ("generate", "score", "train")}
        total = sum(split.values())
        for key, seconds in split.items():
            bench._add("ppo_step", engine_name, shape, dtype, f"{key}_s", seconds)
        bench._add("ppo_step", engine_name, shape, dtype, "ms", total * 1e3)
        if engine_name == "hf":
            bench.baselines[("ppo_step", shape, dtype)] = "hf"
        print(f"  {'ppo_step':28s} {engine_name:24s} {shape:24s} generate {split['generate']:.3f} s, score "
              f"{split['score']:.3f} s, train {split['train']:.3f} s")
