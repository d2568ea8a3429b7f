"""``rlhf-fast demo --task arithmetic``: GRPO with a programmatic reward (RL with verifiable rewards), offline.

Task: sums of two single-digit numbers (``"7 + 8 ="`` -> ``"15"``), the answer kept as a dataset column. A digit-level
tokenizer is built in memory (digits are single tokens, so the model can learn carries). Stages:

1. SFT on a sloppy demonstrator, right only ``DEMO_ACCURACY`` of the time and otherwise off by a small amount, so
   the SFT policy knows the format and roughly where the answer lies but is mostly wrong when sampled;
2. GRPO against ``rlhf_fast.rewards.answer_match`` (1 when the completion's number equals the ``answer`` column):
   no reward model, the reward function reads the column.

``summary.json`` reports the accuracy of sampled answers (temperature 1, ``eval_samples_per_prompt`` samples of
every problem, the same seed before and after) of the SFT policy and of the GRPO policy. The problems are the
prompts GRPO trains on: with 100 single-digit sums there is no held-out set worth the name; the question is
whether the reward function's signal moves the policy, not whether a 200K-parameter model generalises addition.
"""
from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import dataclass

import torch

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DEMO_ACCURACY = 0.5
OFFSETS = [-2, -1, 1, 2]  # how the demonstrator is wrong when it is


@dataclass
class ArithmeticSizes:
    low: int = 0  # operands are drawn from [low, high]
    high: int = 9
    demos_per_problem: int = 40
    sft_steps: int = 200
    grpo_steps: int = 40
    prompts_per_step: int = 16
    num_generations: int = 8
    eval_samples_per_prompt: int = 8


QUICK = ArithmeticSizes(sft_steps=150, grpo_steps=20)


def problems(low: int, high: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]


def prompt_of(a: int, b: int) -> str:
    return f"{a} + {b} ="


def demonstration(a: int, b: int, rng: random.Random) -> str:
    """The sloppy demonstrator's answer: right with probability ``DEMO_ACCURACY``, else off by an offset."""
    answer = a + b
    if rng.random() < DEMO_ACCURACY:
        return str(answer)
    return str(max(0, answer + rng.choice(OFFSETS)))


def build_tokenizer():
    """Digits, ``+``, ``=`` and the special tokens; digits split one per token, decoded without spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + [str(d) for d in range(10)] + ["+", "="]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.decoder = decoders.Fuse()  # "3", "7" -> "37"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def _accuracy(model, tokenizer, rows: list[dict], samples: int, seed: int) -> tuple[float, list[str]]:
    from ..rewards import answer_match
    from ..trainers.data import encode_prompt
    from ..rollout.generation import generate

    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    answers = [r["answer"] for r in rows for _ in range(samples)]
    torch.manual_seed(seed)
    gen = generate(model, [encode_prompt(tokenizer, p) for p in prompts], pad_id=tokenizer.pad_token_id,
                   eos_id=tokenizer.eos_token_id, max_new_tokens=4, temperature=1.0)
    completions = tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
    scores = answer_match(completions, answers)
    return sum(scores) / len(scores), [f"{p} {c}    [answer {a}]" for p, c, a in zip(prompts, completions, answers)]


def run_arithmetic_demo(out_dir: str = "demo_out", *, quick: bool = False, seed: int = 0,
                        threads: int | None = None, progress: bool = True) -> dict:
    """SFT on the sloppy demonstrator, then GRPO on the answer check; writes metrics, samples and summary.json."""
    from ..rewards import answer_match
    from ..trainers import PPOConfig, PPOTrainer, SFTConfig, SFTTrainer
    from .model import tiny_llama_config
    from .pipeline import _quiet_transformers

    from transformers import LlamaForCausalLM

    _quiet_transformers()
    torch.set_num_threads(threads or 1)
    sizes = QUICK if quick else ArithmeticSizes()
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    timings = {}
    tokenizer = build_tokenizer()
    pairs = problems(sizes.low, sizes.high)
    task_rows = [{"prompt": prompt_of(a, b), "answer": a + b} for a, b in pairs]
    rng = random.Random(seed)
    common = dict(seed=seed, disable_tqdm=not progress, report_to=["jsonl"], save_final=False, plot=False)

    stage = time.perf_counter()
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(tiny_llama_config(tokenizer))
    demos = [{"prompt": prompt_of(a, b), "completion": demonstration(a, b, rng)} for a, b in pairs
             for _ in range(sizes.demos_per_problem)]
    sft_args = SFTConfig(output_dir=os.path.join(out_dir, "sft"), max_steps=sizes.sft_steps, learning_rate=3e-3,
                         warmup_ratio=0.05, lr_scheduler_type="cosine", per_device_train_batch_size=64,
                         logging_steps=10, **common)
    SFTTrainer(model=policy, args=sft_args, train_dataset=demos, processing_class=tokenizer).train()
    timings["sft_s"] = time.perf_counter() - stage
    sft_policy = copy.deepcopy(policy).eval()
    samples = sizes.eval_samples_per_prompt
    sft_accuracy, sft_samples = _accuracy(policy, tokenizer, task_rows, samples, seed + 1)

    stage = time.perf_counter()
    grpo_args = PPOConfig(
        output_dir=os.path.join(out_dir, "grpo"), max_steps=sizes.grpo_steps, learning_rate=3e-4,
        lr_scheduler_type="constant", per_device_train_batch_size=sizes.prompts_per_step,
        advantage_estimator="grpo", num_generations=sizes.num_generations, response_length=4, temperature=1.0,
        num_ppo_epochs=2, num_mini_batches=2, kl_coef=0.0, logging_steps=1, **common,
    )
    trainer = PPOTrainer(args=grpo_args, processing_class=tokenizer, model=policy, ref_model=sft_policy,
                         reward_model=answer_match, train_dataset=task_rows)
    history = trainer.train()
    timings["grpo_s"] = time.perf_counter() - stage
    grpo_accuracy, grpo_samples = _accuracy(policy, tokenizer, task_rows, samples, seed + 1)

    for name, lines in (("samples_before.txt", sft_samples), ("samples_after.txt", grpo_samples)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    summary = {
        "task": "arithmetic", "seed": seed, "quick": quick,
        "sft_accuracy": sft_accuracy, "grpo_accuracy": grpo_accuracy, "accuracy_gain": grpo_accuracy - sft_accuracy,
        "grpo_reward_first": history[0]["reward"],
        "grpo_reward_final": sum(r["reward"] for r in history[-5:]) / len(history[-5:]),
        "problems": len(task_rows), "eval_samples": len(task_rows) * samples,
        "parameters": sum(p.numel() for p in policy.parameters()),
        **{k: round(v, 2) for k, v in timings.items()}, "runtime_s": round(time.perf_counter() - started, 2),
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary
