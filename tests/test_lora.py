"""LoRA / PEFT (the ``peft`` library) in every trainer: only adapters train, the reference is the base model with
the adapters disabled (no copy), adapters are saved and resumed."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="LoRA tests need peft: pip install 'rlhf_fast[peft]'")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import (DPOConfig, DPOTrainer, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer,  # noqa: E402
                       SFTConfig, SFTTrainer)
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)
PROMPTS = [p for p, _ in task.all_prompts()[:16]]
PAIRS = [{"prompt": p, "chosen": "the room was great and the pool was fine .", "rejected": "the room was awful ."}
         for p in PROMPTS[:8]]


def tiny(tokenizer, kind="lm", seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    return cls(config)


def lora(task_type="CAUSAL_LM"):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], task_type=task_type)


def positive_fraction(prompts, completions):
    return [sum(w in task.POSITIVE for w in c.split()) / max(1, len(c.split())) for c in completions]


def ppo(tokenizer, out, ref_model=None, **overrides):
    torch.manual_seed(0)
    args = PPOConfig(output_dir=str(out), max_steps=3, learning_rate=3e-2, per_device_train_batch_size=4,
                     num_generations=2, advantage_estimator="grpo", response_length=6, temperature=1.0,
                     num_ppo_epochs=2, **QUIET, **overrides)
    return PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), ref_model=ref_model,
                      reward_model=positive_fraction, train_dataset=[{"prompt": p} for p in PROMPTS],
                      peft_config=lora())


@pytest.mark.parametrize("from_hidden", [False, True])
def test_ppo_adapter_disabled_reference_equals_a_frozen_full_copy(tokenizer, tmp_path, from_hidden):
    """Three PPO steps: from step 2 on the adapters have moved, so a reference that ran with them on would differ."""
    count = lambda t: sum(p.numel() for p in {id(p): p for m in (t.policy, t.ref_model) for p in m.parameters()}.values())  # noqa: E731
    # each trainer samples from the global RNG its constructor seeded: build and train one after the other
    adapter = ppo(tokenizer, tmp_path / "a", logprobs_from_hidden=from_hidden)
    history_a, size_a = adapter.train(), count(adapter)
    copied = ppo(tokenizer, tmp_path / "b", ref_model=tiny(tokenizer), logprobs_from_hidden=from_hidden)
    history_b, size_b = copied.train(), count(copied)
    assert adapter.adapter_reference and not copied.adapter_reference
    assert size_a < size_b  # no second copy of the weights
    assert abs(history_a[-1]["kl"]) > 1e-3  # the policy moved away from the reference
    for a, b in zip(history_a, history_b):
        for key in ("kl", "reward", "pg_loss", "approx_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for (name, a), b in zip(adapter.policy.named_parameters(), copied.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_sft_trains_only_the_adapters_and_saves_them(tokenizer, tmp_path):
    data = [{"prompt": p, "completion": "the room was great and the pool was fine ."} for p in PROMPTS[:8]]
    model = tiny(tokenizer)
    base = copy.deepcopy(model.state_dict())
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), max_steps=20, learning_rate=1e-1,
                                                     **{**QUIET, "save_final": True}),
                         train_dataset=data, processing_class=tokenizer, peft_config=lora())
    history = trainer.train()
    assert history[-1]["loss"] < 0.95 * history[0]["loss"]  # rank-4 adapters on a 1-layer model learn slowly
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.1 * sum(p.numel() for p in trainer.model.parameters())
    for name, value in trainer.model.get_base_model().state_dict().items():  # the base weights never moved
        if "lora_" not in name:
            torch.testing.assert_close(value, base[name.replace(".base_layer", "")], rtol=0, atol=0)
    saved = tmp_path / "final" / "model"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    reloaded = peft.PeftModel.from_pretrained(tiny(tokenizer), str(saved))
    for (name, a), b in zip(trainer.model.named_parameters(), reloaded.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_reward_model_with_lora_learns(tokenizer, tmp_path):
    args = RewardConfig(output_dir=str(tmp_path), max_steps=20, learning_rate=2e-2, per_device_train_batch_size=8,
                        **QUIET)
    trainer = RewardTrainer(model=tiny(tokenizer, "rm"), args=args, train_dataset=PAIRS, eval_dataset=PAIRS,
                            processing_class=tokenizer, peft_config=lora("SEQ_CLS"))
    history = trainer.train()
    assert history[-2]["loss"] < 0.5 * history[0]["loss"] and trainer.evaluate()["eval_accuracy"] == 1.0


def dpo(tokenizer, out, ref_model=None, **overrides):
    args = DPOConfig(output_dir=str(out), **{"max_steps": 3, "learning_rate": 3e-2, "per_device_train_batch_size": 4,
                                             "beta": 0.5, **QUIET, **overrides})
    return DPOTrainer(tiny(tokenizer), ref_model, args=args, train_dataset=PAIRS, processing_class=tokenizer,
                      peft_config=lora())


def test_dpo_adapter_disabled_reference_equals_a_frozen_copy_and_resumes(tokenizer, tmp_path):
    adapter = dpo(tokenizer, tmp_path / "a")
    history_a = adapter.train()
    copied = dpo(tokenizer, tmp_path / "b", ref_model=tiny(tokenizer))
    history_b = copied.train()
    assert adapter.uses_adapter_reference and adapter.ref_runner is None
    assert history_a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history_a[-1]["rewards/margins"] > 0.01  # the adapters moved: a reference with them on would give 0
    assert 0 < history_a[0]["trainable_params"] < 0.1 * history_a[0]["total_params"]
    assert history_a[0]["total_params"] < history_b[0]["total_params"]  # no reference copy
    for a, b in zip(history_a, history_b):
        for key in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    # resume: adapters and their optimizer state come back exactly
    part = dpo(tokenizer, tmp_path / "p", save_steps=2)
    part.num_training_steps = 2
    part.train()
    assert (tmp_path / "p" / "checkpoint-2" / "model" / "adapter_model.safetensors").is_file()
    resumed = dpo(tokenizer, tmp_path / "r", resume_from=str(tmp_path / "p" / "checkpoint-2"))
    resumed.train()
    for a, b in zip(adapter.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_linear_logprobs_skips_the_frozen_heads_weight_gradient():
    """With the LM head frozen (LoRA leaves it so) the fused head computes no weight gradient at all."""
    from rlhf_fast import ops

    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    labels = torch.randint(0, 40, (6,))
    calls = []

    def count_mm(module, *_):
        calls.append(module)

    def matmuls(weight):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops.linear_logprobs(hidden, weight, labels).sum().backward()
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::matmul"))

    frozen = matmuls(weight)
    trained = matmuls(weight.clone().requires_grad_(True))
    assert frozen < trained
