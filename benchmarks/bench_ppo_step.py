"""One PPO update on a small Llama, with the rlhf_fast kernels (auto dispatch) against ``RLHF_FAST_BACKEND=torch``.

Two phases per backend, each in its own process (so dispatch and peak memory are per backend):
- ``update``: ``num_ppo_epochs`` x ``num_mini_batches`` optimizer steps on a fixed rollout (rollout excluded);
- ``step``:   generate + score + update (rollout included).
Reports median seconds, tokens per second (sequence tokens processed: epochs x batch tokens for ``update``,
batch tokens for ``step``) and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS,
which includes the Python and library baseline). On CPU the auto backend is the PyTorch reference for every op
except GAE (C++), so the two rows measure nearly the same code: real kernel numbers need a GPU.

    python benchmarks/bench_ppo_step.py                 # CPU-sized defaults
    python benchmarks/bench_ppo_step.py --preset gpu    # a 4-layer, 32k-vocab model on CUDA
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PRESETS = {
    "cpu": dict(vocab=4096, hidden=256, layers=4, heads=4, batch=16, prompt=64, response=64, repeats=3),
    "gpu": dict(vocab=32000, hidden=1024, layers=4, heads=16, batch=64, prompt=256, response=256, repeats=5),
}


def worker(options: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_fast import PPOConfig, PPOTrainer

    torch.set_num_threads(options["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(vocab_size=options["vocab"], hidden_size=options["hidden"],
                         intermediate_size=options["hidden"] * 8 // 3, num_hidden_layers=options["layers"],
                         num_attention_heads=options["heads"], num_key_value_heads=options["heads"],
                         max_position_embeddings=options["prompt"] + options["response"] + 8, num_labels=1,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    policy, reward = LlamaForCausalLM(config), LlamaForSequenceClassification(config)

    class Tokenizer:  # fixed-length random prompts need no real tokenizer: ids in, ids out
        pad_token_id, bos_token_id, eos_token_id = 0, None, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(t) for t in text.split()]}

        def batch_decode(self, ids, skip_special_tokens=True):
            return [" ".join(map(str, row)) for row in ids]

    generator = torch.Generator().manual_seed(0)
    prompts = [{"prompt": " ".join(map(str, torch.randint(3, options["vocab"], (options["prompt"],),
                                                          generator=generator).tolist()))}
               for _ in range(options["batch"])]
    args = PPOConfig(output_dir=options["tmp"], max_steps=options["repeats"] + 1, per_device_train_batch_size=options["batch"],
                     response_length=options["response"], stop_token=None, temperature=1.0, num_ppo_epochs=1,
                     num_mini_batches=1, max_tokens_per_micro_batch=options["max_tokens"], max_length=10**6,
                     disable_tqdm=True, report_to=[], plot=False, save_final=False, device=device,
                     logprobs_from_hidden=options["from_hidden"])
    trainer = PPOTrainer(args=args, processing_class=Tokenizer(), model=policy, reward_model=reward, train_dataset=prompts)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    experience = trainer.make_experience(trainer._prompt_batch(0))
    tokens = int(experience["lengths"].sum())
    trainer.update(experience)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    update_times = []
    for _ in range(options["repeats"]):
        sync()
        start = time.perf_counter()
        trainer.update(experience)
        sync()
        update_times.append(time.perf_counter() - start)
    update_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    step_times = []
    for _ in range(options["repeats"]):
        sync()
        start = time.perf_counter()
        trainer.step()
        sync()
        step_times.append(time.perf_counter() - start)
    step_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({options['threads']} threads)"
    update_s, step_s = statistics.median(update_times), statistics.median(step_times)
    return {
        "device": name,
        "rows": [
            {"phase": "update (rollout excluded)", "median_s": update_s, "tokens_per_s": tokens / update_s,
             "peak_mem_mb": update_peak if update_peak is not None else rss,
             "mem_kind": "cuda max_allocated" if update_peak is not None else "process peak RSS"},
            {"phase": "step (rollout included)", "median_s": step_s, "tokens_per_s": tokens / step_s,
             "peak_mem_mb": step_peak if step_peak is not None else rss,
             "mem_kind": "cuda max_allocated" if step_peak is not None else "process peak RSS"},
        ],
    }


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, else cpu")
    parser.add_argument("--backends", nargs="+", default=["auto", "torch"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8192, help="token budget of a micro-batch")
    parser.add_argument("--from-hidden", action="store_true", help="logprobs_from_hidden=True (fused lm_head)")
    parser.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/ppo_step_<device>.csv)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(worker(json.loads(cli.worker))))
        return
    import tempfile

    import torch

    preset = cli.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    rows = []
    for backend in cli.backends:
        with tempfile.TemporaryDirectory() as tmp:
            options = {**PRESETS[preset], "threads": cli.threads, "max_tokens": cli.max_tokens,
                       "from_hidden": cli.from_hidden, "tmp": tmp}
            env = dict(os.environ)
            env.pop("RLHF_FAST_BACKEND", None)
            if backend != "auto":
                env["RLHF_FAST_BACKEND"] = backend
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(options)], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"backend {backend} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
        for row in result["rows"]:
            rows.append({"backend": backend, **row, "device": result["device"], "preset": preset,
                         "shape": f"B={options['batch']} P={options['prompt']} R={options['response']} "
                                  f"V={options['vocab']} H={options['hidden']} L={options['layers']}",
                         "from_hidden": cli.from_hidden, "commit": commit()})
    device_tag = rows[0]["device"].split(" (")[0].replace(" ", "_").lower()
    out = cli.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ppo_step_{device_tag}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"| backend | phase | median s | tokens/s | peak MB ({rows[0]['mem_kind']}) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['phase']} | {row['median_s']:.3f} | {row['tokens_per_s']:.0f} | "
              f"{row['peak_mem_mb']:.0f} |")
    print(f"device: {rows[0]['device']}, shape: {rows[0]['shape']}; CSV: {out}")


if __name__ == "__main__":
    main()
