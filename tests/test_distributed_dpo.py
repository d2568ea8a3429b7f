"""DPO (and LoRA) under torchrun equals one process on the same global batch (2 CPU ranks, gloo; DDP and FSDP2).

One ``torchrun --standalone --nproc_per_node 2`` launch runs this file as a script; each rank takes half of every
global micro-batch's pairs, split by the batcher's cross-rank plan into token-budgeted passes (a small budget, so
that ranks run several passes and placeholder passes). The tests run the same updates in one process and compare
the saved parameters and the logged metrics.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import DPOConfig, DPOTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import load_tokenizer, tiny_llama_config  # noqa: E402

RANKS = 2
STRATEGIES = ("ddp", "fsdp2")
QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, adam_epsilon=1.0, max_grad_norm=None)
PROMPTS = [p for p, _ in task.all_prompts()[:16]]
PAIRS = [{"prompt": p, "chosen": "the room was great and the pool was fine .", "rejected": "the room was awful ."}
         if i % 3 else {"prompt": p, "chosen": "the food was great .", "rejected": "the food was bad and cold ."}
         for i, p in enumerate(PROMPTS[:12])]
TOLERANCE = 1e-5
try:
    import peft  # noqa: F401

    HAS_PEFT = True
except ImportError:
    HAS_PEFT = False
SCENARIOS = {"dpo": {}, "dpo-logits-ipo": {"logprobs_from_hidden": False, "loss_type": "ipo"},
             "dpo-precomputed": {"precompute_ref_log_probs": True}}


def tiny(tokenizer, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2))


def lora_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM")


def dpo_run(tokenizer, out, world, lora=False, **overrides):
    args = DPOConfig(output_dir=str(out), max_steps=2, learning_rate=0.3, beta=0.5, per_device_train_batch_size=8 // world,
                     gradient_accumulation_steps=2, max_tokens_per_micro_batch=48, **QUIET, **overrides)
    trainer = DPOTrainer(tiny(tokenizer), args=args, train_dataset=PAIRS, processing_class=tokenizer,
                         peft_config=lora_config() if lora else None)
    trainer.train()
    return trainer


def worker(out: str) -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    for strategy in STRATEGIES:
        for name, overrides in SCENARIOS.items():
            dpo_run(tokenizer, os.path.join(out, f"{name}-{strategy}"), RANKS, distributed=strategy, **overrides)
        if HAS_PEFT:
            dpo_run(tokenizer, os.path.join(out, f"lora-{strategy}"), RANKS, lora=True, distributed=strategy)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks_dpo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
               __file__, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


def saved_state(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_distributed_dpo_update_equals_one_process(two_rank_runs, tokenizer, tmp_path, strategy, name):
    single = dpo_run(tokenizer, tmp_path, 1, distributed="none", **SCENARIOS[name])
    saved, expected = saved_state(two_rank_runs / f"{name}-{strategy}" / "final" / "model"), single.model.state_dict()
    assert sorted(saved) == sorted(expected)
    worst = max(float((saved[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= TOLERANCE, f"{name}, {strategy}: largest parameter difference {worst:.3g}"
    moved = max(float((expected[k] - v).abs().max()) for k, v in tiny(tokenizer).state_dict().items())
    assert moved > 100 * TOLERANCE
    ranks, one = read_metrics(two_rank_runs / f"{name}-{strategy}"), single.logger.history
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "grad_norm"):
        assert [r[key] for r in ranks] == pytest.approx([r[key] for r in one], abs=1e-5), key


@pytest.mark.skipif(not HAS_PEFT, reason="LoRA needs peft: pip install 'rlhf_fast[peft]'")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_dpo_with_lora_equals_one_process(two_rank_runs, tokenizer, tmp_path, strategy):
    """LoRA adapters under DDP / FSDP2, the reference being the base model with the adapters off on every rank."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    single = dpo_run(tokenizer, tmp_path, 1, lora=True, distributed="none")
    saved = load_file(str(two_rank_runs / f"lora-{strategy}" / "final" / "model" / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(single.model)
    assert sorted(saved) == sorted(expected) and saved
    worst = max(float((saved[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= TOLERANCE, f"LoRA, {strategy}: largest adapter difference {worst:.3g}"
    assert max(float(v.abs().max()) for k, v in expected.items() if "lora_B" in k) > 100 * TOLERANCE  # adapters moved
    ranks, one = read_metrics(two_rank_runs / f"lora-{strategy}"), single.logger.history
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert [r[key] for r in ranks] == pytest.approx([r[key] for r in one], abs=1e-5), key


if __name__ == "__main__":
    worker(sys.argv[1])
