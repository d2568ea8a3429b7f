"""``rlhf-fast demo``: SFT on demonstrations -> reward model on annotator pairs -> PPO against the reward model,
and / or (``method="dpo"`` / ``"both"``) DPO from the SFT policy on the same annotator's pairs.

Everything is offline: the tokenizer ships in rlhf_fast/data/, the models are built from a ``LlamaConfig``, the
data and the annotator come from rlhf_fast/demo/task.py. The annotator's hidden rule only labels preference pairs
and evaluates samples; PPO optimises the learned reward model.
"""
from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import dataclass

import torch

from . import task
from .model import load_tokenizer, tiny_llama_config, tiny_policy


@dataclass
class DemoSizes:
    sft_examples_per_prompt: int = 20
    sft_steps: int = 300
    rm_pairs_rounds: int = 24  # rounds of one sampled pair per training prompt
    rm_steps: int = 400
    ppo_steps: int = 80
    ppo_prompts_per_step: int = 32
    dpo_steps: int = 200
    eval_samples_per_prompt: int = 8


QUICK = DemoSizes(sft_examples_per_prompt=10, sft_steps=150, rm_pairs_rounds=10, rm_steps=150, ppo_steps=25,
                  dpo_steps=80, eval_samples_per_prompt=4)
METHODS = ("ppo", "dpo", "both")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _sample(model, tokenizer, prompts: list[str], *, temperature: float, max_new_tokens: int) -> list[str]:
    from ..trainers.data import encode_prompt
    from ..rollout.generation import generate

    gen = generate(model, [encode_prompt(tokenizer, p) for p in prompts], pad_id=tokenizer.pad_token_id,
                   eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens, temperature=temperature)
    return tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)


@torch.no_grad()
def _response_kl(policy, ref_model, tokenizer, prompts, completions) -> float:
    """Mean over samples of sum_t log(pi / ref) on the response tokens (a Monte-Carlo KL(pi || ref))."""
    from .. import ops
    from ..trainers.data import encode_completion, encode_prompt
    from ..trainers.rollout import per_token_in_micro_batches, response_mask, token_logprobs

    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    response_ids = [encode_completion(tokenizer, c) for c in completions]
    sequences = [p + r for p, r in zip(prompt_ids, response_ids)]
    mask = response_mask([len(p) for p in prompt_ids], [len(r) for r in response_ids], max(map(len, sequences)) - 1)
    kw = dict(pad_id=tokenizer.pad_token_id, max_tokens=4096, device=torch.device("cpu"))
    logp = per_token_in_micro_batches(lambda i, a: token_logprobs(policy, i, a, temperature=1.0), sequences, **kw)
    ref = per_token_in_micro_batches(lambda i, a: token_logprobs(ref_model, i, a, temperature=1.0), sequences, **kw)
    return float((ops.token_kl(logp, ref, estimator="k1") * mask).sum(-1).mean())


def _write_samples(path: str, title: str, prompts, completions) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"# {title}\n\n")
        for prompt, completion in zip(prompts, completions):
            handle.write(f"{prompt}  =>  {completion}    [ground truth {task.ground_truth_score(completion):.2f}]\n")


def _mean_gt(completions) -> float:
    return sum(task.ground_truth_score(c) for c in completions) / len(completions)


def run_demo(out_dir: str = "demo_out", *, quick: bool = False, seed: int = 0, threads: int | None = None,
             progress: bool = True, method: str = "ppo", rollout_engine: str = "hf",
             advantage_estimator: str = "gae") -> dict:
    """Run the stages and write metrics, plots, samples and ``summary.json`` to ``out_dir``.

    ``method``: ``ppo`` (SFT -> reward model -> PPO), ``dpo`` (SFT -> DPO on the annotator's pairs) or ``both``
    (SFT, then PPO and DPO each from the same SFT policy, pairs and held-out prompts).
    ``rollout_engine="vllm"`` samples PPO's rollouts with vLLM; its CPU attention has no kernel for the default
    models' head size (24), so the models then have 3 heads of 32 instead of 4 of 24 (same width).
    ``advantage_estimator="grpo"`` / ``"rloo"``: critic-free, 4 samples for each of a quarter of the prompts."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    from ..trainers import SFTConfig, SFTTrainer

    _quiet_transformers()
    # one thread: these models are too small to gain from intra-op threads, and on a shared machine
    # extra threads mostly wait on each other (measured 7x slower with 2 threads under load)
    torch.set_num_threads(threads or 1)
    sizes = QUICK if quick else DemoSizes()
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    timings = {}
    tokenizer = load_tokenizer()
    train_prompts, eval_prompts = task.split_prompts(seed)
    rng = random.Random(seed)
    common = dict(seed=seed, disable_tqdm=not progress, report_to=["jsonl", "tensorboard"], save_final=True)
    response_length, temperature = 16, 1.0

    # ---- stage 1: SFT on demonstrations ---------------------------------------------------------------------
    stage = time.perf_counter()
    torch.manual_seed(seed)
    policy = tiny_policy(tokenizer, **(dict(heads=3) if rollout_engine == "vllm" else {}))
    demos = [{"prompt": p, "completion": task.demonstration(topic, rng)}
             for p, topic in train_prompts for _ in range(sizes.sft_examples_per_prompt)]
    eval_demos = [{"prompt": p, "completion": task.demonstration(topic, rng)} for p, topic in eval_prompts]
    sft_args = SFTConfig(output_dir=os.path.join(out_dir, "sft"), max_steps=sizes.sft_steps, learning_rate=3e-3,
                         warmup_ratio=0.05, lr_scheduler_type="cosine", per_device_train_batch_size=32,
                         logging_steps=10, **common)
    SFTTrainer(model=policy, args=sft_args, train_dataset=demos, eval_dataset=eval_demos,
               processing_class=tokenizer).train()
    timings["sft_s"] = time.perf_counter() - stage

    # ---- stage 2: the annotator's preference pairs of SFT samples (the reward model's and DPO's data) ---------
    stage = time.perf_counter()

    def labelled_pairs(prompts, rounds):
        texts = [p for p, _ in prompts for _ in range(rounds)]
        first = _sample(policy, tokenizer, texts, temperature=temperature, max_new_tokens=response_length)
        second = _sample(policy, tokenizer, texts, temperature=temperature, max_new_tokens=response_length)
        pairs = []
        for prompt, a, b in zip(texts, first, second):
            label = task.annotate(prompt, a, b)
            if label is not None:  # annotators skip ties
                pairs.append({"prompt": prompt, "chosen": label[0], "rejected": label[1]})
        return pairs

    rm_train = labelled_pairs(train_prompts, sizes.rm_pairs_rounds)
    rm_eval = labelled_pairs(eval_prompts, 4)  # held-out prompts, never trained on
    timings["pairs_s"] = time.perf_counter() - stage
    sft_policy = copy.deepcopy(policy).eval()
    eval_texts = [p for p, _ in eval_prompts for _ in range(sizes.eval_samples_per_prompt)]
    torch.manual_seed(seed + 1)
    sft_samples = _sample(sft_policy, tokenizer, eval_texts, temperature=temperature, max_new_tokens=response_length)
    _write_samples(os.path.join(out_dir, "samples_before.txt"), "SFT policy on held-out prompts", eval_texts, sft_samples)
    sft_gt = _mean_gt(sft_samples)
    summary = {"seed": seed, "quick": quick, "method": method, "rollout_engine": rollout_engine,
               "advantage_estimator": advantage_estimator, "rm_train_pairs": len(rm_train),
               "rm_eval_pairs": len(rm_eval), "sft_gt_score": sft_gt,
               "parameters": sum(p.numel() for p in policy.parameters()), "eval_samples": len(eval_texts)}
    stages = ["sft"]
    if method in ("dpo", "both"):
        stages.append("dpo")
        stage = time.perf_counter()
        dpo_policy = copy.deepcopy(sft_policy).train()
        summary.update(_dpo_stage(dpo_policy, sft_policy, tokenizer, rm_train, rm_eval, out_dir, common, sizes))
        torch.manual_seed(seed + 1)
        dpo_samples = _sample(dpo_policy, tokenizer, eval_texts, temperature=temperature, max_new_tokens=response_length)
        _write_samples(os.path.join(out_dir, "samples_after_dpo.txt"), "DPO policy on held-out prompts", eval_texts,
                       dpo_samples)
        dpo_gt = _mean_gt(dpo_samples)
        summary.update({"dpo_gt_score": dpo_gt, "dpo_gt_improvement": (dpo_gt - sft_gt) / max(sft_gt, 1e-8),
                        "dpo_kl_to_sft": _response_kl(dpo_policy, sft_policy, tokenizer, eval_texts, dpo_samples)})
        timings["dpo_s"] = time.perf_counter() - stage
    if method in ("ppo", "both"):
        stages += ["rm", "ppo"]
        summary.update(_rm_and_ppo_stages(policy, sft_policy, tokenizer, rm_train, rm_eval, train_prompts, eval_texts,
                                          sft_samples, out_dir, common, sizes, seed, timings, response_length,
                                          temperature, rollout_engine=rollout_engine,
                                          advantage_estimator=advantage_estimator))
    with open(os.path.join(out_dir, "metrics.jsonl"), "w", encoding="utf-8") as merged:
        for name in stages:
            with open(os.path.join(out_dir, name, "metrics.jsonl"), encoding="utf-8") as handle:
                for line in handle:
                    merged.write(json.dumps({"stage": name, **json.loads(line)}) + "\n")
    summary.update({k: round(v, 2) for k, v in timings.items()})
    summary["runtime_s"] = round(time.perf_counter() - started, 2)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def _dpo_stage(policy, sft_policy, tokenizer, pairs, eval_pairs, out_dir, common, sizes) -> dict:
    """DPO from the SFT policy on the annotator's pairs; the SFT policy is the (frozen) reference."""
    from ..trainers import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=os.path.join(out_dir, "dpo"), max_steps=sizes.dpo_steps, learning_rate=2e-4,
                     beta=0.1, warmup_ratio=0.05, lr_scheduler_type="cosine", per_device_train_batch_size=32,
                     logging_steps=10, **common)
    trainer = DPOTrainer(policy, copy.deepcopy(sft_policy), args=args, train_dataset=pairs, eval_dataset=eval_pairs,
                         processing_class=tokenizer)
    trainer.train()
    held_out = trainer.evaluate()
    return {"dpo_eval_accuracy": held_out["eval_rewards/accuracies"], "dpo_eval_loss": held_out["eval_loss"]}


def _rm_and_ppo_stages(policy, sft_policy, tokenizer, rm_train, rm_eval, train_prompts, eval_texts, sft_samples,
                       out_dir, common, sizes, seed, timings, response_length, temperature, *,
                       rollout_engine: str = "hf", advantage_estimator: str = "gae") -> dict:
    """Reward model from the SFT body on the annotator's pairs, then PPO against it (``policy`` is trained)."""
    from transformers import LlamaForSequenceClassification

    from ..trainers import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer
    from ..trainers.metrics import plot_metrics

    stage = time.perf_counter()
    reward_model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, heads=policy.config.num_attention_heads))
    reward_model.model.load_state_dict(policy.model.state_dict())  # start from the SFT body, as InstructGPT
    rm_args = RewardConfig(output_dir=os.path.join(out_dir, "rm"), max_steps=sizes.rm_steps, learning_rate=1e-3,
                           warmup_ratio=0.05, lr_scheduler_type="cosine", per_device_train_batch_size=32,
                           center_rewards_coefficient=0.01, logging_steps=10, **common)
    rm_trainer = RewardTrainer(model=reward_model, args=rm_args, train_dataset=rm_train, eval_dataset=rm_eval,
                               processing_class=tokenizer)
    rm_trainer.train()
    rm_eval_metrics = rm_trainer.evaluate()
    timings["rm_s"] = time.perf_counter() - stage

    # ---- stage 3: PPO against the reward model -------------------------------------------------------------
    stage = time.perf_counter()

    def ground_truth_of_rollouts(trainer, prompts, completions):  # evaluation only: PPO never sees it
        return {"gt_score": _mean_gt(completions)}

    group = 1 if advantage_estimator == "gae" else 4  # the same number of rollouts per step
    ppo_args = PPOConfig(
        output_dir=os.path.join(out_dir, "ppo"), max_steps=sizes.ppo_steps, learning_rate=1.5e-4,
        lr_scheduler_type="constant_with_warmup", warmup_steps=4,
        per_device_train_batch_size=sizes.ppo_prompts_per_step // group, num_generations=group,
        advantage_estimator=advantage_estimator, rollout_engine=rollout_engine, response_length=response_length, temperature=temperature, num_ppo_epochs=4, num_mini_batches=2,
        kl_coef=0.1, target_kl=2.0, kl_horizon=200, vf_coef=0.5, cliprange=0.2, cliprange_value=0.2,
        missing_eos_penalty=1.0, **common,
    )
    ppo = PPOTrainer(args=ppo_args, processing_class=tokenizer, model=policy, ref_model=sft_policy,
                     reward_model=reward_model, train_dataset=[{"prompt": p} for p, _ in train_prompts],
                     callbacks=[ground_truth_of_rollouts])
    try:
        history = ppo.train()
    finally:
        ppo.close()  # a vLLM engine's processes
    torch.manual_seed(seed + 1)
    ppo_samples = _sample(policy, tokenizer, eval_texts, temperature=temperature, max_new_tokens=response_length)
    timings["ppo_s"] = time.perf_counter() - stage

    _write_samples(os.path.join(out_dir, "samples_after.txt"), "PPO policy on held-out prompts", eval_texts, ppo_samples)
    plot_metrics(history, os.path.join(out_dir, "ppo_progress.png"), keys=["reward", "kl", "gt_score"],
                 title="PPO against the learned reward model")
    sft_gt, ppo_gt = _mean_gt(sft_samples), _mean_gt(ppo_samples)
    tail = history[-max(1, len(history) // 10):]
    return {
        "rm_accuracy": rm_eval_metrics["eval_accuracy"], "ppo_gt_score": ppo_gt,
        "gt_improvement": (ppo_gt - sft_gt) / max(sft_gt, 1e-8),
        "kl_to_sft": _response_kl(policy, sft_policy, tokenizer, eval_texts, ppo_samples),
        "ppo_train_kl_final": sum(r["kl"] for r in tail) / len(tail),
        "ppo_reward_first": history[0]["reward"], "ppo_reward_final": sum(r["reward"] for r in tail) / len(tail),
    }
