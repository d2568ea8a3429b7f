"""Rollout engines without vLLM: the importance weights and mismatch metrics against a direct computation, the
engine log-probs' layout, the config fields, and the error when the vllm engine is not installed."""
import importlib.util
import math

import pytest
import torch

from rlhf_fast.rollout import SamplingSettings, importance_weights, mismatch_metrics, per_token_engine_logp
from rlhf_fast.trainers.rollout import response_mask


def direct_weights(trainer, engine, mask, cap):
    rows = []
    for t_row, e_row, m_row in zip(trainer.tolist(), engine.tolist(), mask.tolist()):
        rows.append([min(math.exp(t - e), cap) if m else 1.0 for t, e, m in zip(t_row, e_row, m_row)])
    return torch.tensor(rows)


def test_importance_weights_and_cap_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    trainer = -torch.rand(4, 7, generator=gen) * 3
    engine = trainer + torch.randn(4, 7, generator=gen) * 0.8  # some ratios far above the cap
    mask = (torch.rand(4, 7, generator=gen) > 0.3).float()
    for cap in (1.0, 1.5, 3.0, 100.0):
        weights = importance_weights(trainer, engine, mask, cap=cap)
        torch.testing.assert_close(weights, direct_weights(trainer, engine, mask, cap), rtol=1e-6, atol=1e-6)
        assert float(weights.max()) <= cap + 1e-6
    assert bool((importance_weights(trainer, engine, mask, cap=1.5) == 1.5).any())  # the cap was reached


def test_mismatch_metrics_match_a_direct_computation():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.1, -3.0, 0.0, 0.0]])
    engine = torch.tensor([[-1.5, -1.0, -0.5, 9.0], [-0.1, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    out = mismatch_metrics(trainer, engine, mask, cap=1.5)
    diffs = [-0.5, 1.0, 0.0, 0.0, 2.0]  # engine - trainer on the 5 masked tokens
    assert out["engine_logp_diff_mean"] == pytest.approx(sum(abs(d) for d in diffs) / 5)
    assert out["engine_logp_diff_max"] == pytest.approx(2.0)
    assert out["engine_kl"] == pytest.approx(sum(diffs) / 5)
    # ratio exp(trainer - engine) > 1.5 only where engine is 0.5 below the trainer (exp(0.5) = 1.65)
    assert out["engine_is_truncated_frac"] == pytest.approx(1 / 5)


def test_importance_weights_refuse_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cap: expected a positive value"):
        importance_weights(x, x, x, cap=0.0)
    with pytest.raises(ValueError, match="engine_logp: expected the shape"):
        importance_weights(x, torch.zeros(2, 4), x, cap=2.0)


def test_engine_logprobs_sit_on_the_response_mask():
    prompt_lens, responses = [3, 1, 0], [[-0.1, -0.2], [-0.3, -0.4, -0.5], [-0.6, -0.7, -0.8]]
    width = 5
    out = per_token_engine_logp(prompt_lens, responses, width)
    mask = response_mask(prompt_lens, [len(r) for r in responses], width)
    assert torch.equal(out != 0, mask > 0)
    assert out[0, 2:4].tolist() == pytest.approx([-0.1, -0.2])  # label t+1 at position t: p - 1 + j
    assert out[1, 0:3].tolist() == pytest.approx([-0.3, -0.4, -0.5])
    assert out[2, 0:2].tolist() == pytest.approx([-0.7, -0.8])  # no position predicts an empty prompt's first token


def test_ppo_config_rollout_fields():
    from rlhf_fast import PPOConfig

    assert PPOConfig().rollout_engine == "hf"
    with pytest.raises(ValueError, match="rollout_engine: expected one of"):
        PPOConfig(rollout_engine="sglang")
    with pytest.raises(ValueError, match="vllm_importance_sampling_cap: expected"):
        PPOConfig(vllm_importance_sampling_cap=0)
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization: expected"):
        PPOConfig(vllm_gpu_memory_utilization=1.5)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_engine_not_installed_is_a_clear_error(tokenizer, tmp_path):
    from rlhf_fast import PPOConfig, PPOTrainer
    from rlhf_fast.demo.model import tiny_policy

    args = PPOConfig(output_dir=str(tmp_path), rollout_engine="vllm", advantage_estimator="grpo", num_generations=2,
                     disable_tqdm=True, report_to=[], plot=False)
    with pytest.raises(ImportError, match=r"rollout_engine='vllm': the vllm package is not importable.*setup_vllm_env"):
        PPOTrainer(args=args, processing_class=tokenizer, model=tiny_policy(tokenizer, hidden_size=32, layers=1),
                   reward_model=lambda p, c: [0.0] * len(c), train_dataset=[{"prompt": "anna asks : review the food"}])


def test_hf_engine_samples_like_generate(tokenizer):
    from rlhf_fast.demo.model import tiny_policy
    from rlhf_fast.rollout import make_engine
    from rlhf_fast.trainers.data import encode_prompt
    from rlhf_fast.rollout.generation import generate

    torch.manual_seed(0)
    model = tiny_policy(tokenizer, hidden_size=32, layers=1)
    prompts = [encode_prompt(tokenizer, "anna asks : review the food")] * 3
    engine = make_engine("hf", model=model, pad_id=tokenizer.pad_token_id)
    sampling = SamplingSettings(max_new_tokens=5, temperature=1.0, eos_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    out = engine.generate(prompts, sampling)
    torch.manual_seed(1)
    expected = generate(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=5)
    assert out.response_ids == expected.response_ids and out.stopped == expected.stopped
    assert out.logprobs is None and not engine.sync_weights(model, version=3)


def test_rollout_benchmark_quick_records_tokens_and_the_step_split():
    from rlhf_fast.bench import rollout
    from rlhf_fast.bench.harness import Bench

    bench = Bench(quick=True, device=torch.device("cpu"))
    rollout.run(bench)
    metrics = {(r.op, r.provider, r.metric): r.value for r in bench.rows}
    assert metrics[("generate", "hf", "tokens_per_s")] > 0
    for key in ("generate_s", "score_s", "train_s"):
        assert metrics[("ppo_step", "hf", key)] > 0
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert any(provider == "vllm" for _, provider, _ in metrics) == has_vllm


def test_importance_weights_reach_the_policy_loss(tokenizer, tmp_path):
    """Weights of 0.5 on every token halve the policy loss, so the update's (pre-clip) gradient norm halves."""
    from rlhf_fast import PPOConfig, PPOTrainer
    from rlhf_fast.demo import task
    from rlhf_fast.demo.model import tiny_policy

    torch.manual_seed(0)
    args = PPOConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-30, per_device_train_batch_size=4,
                     num_generations=2, advantage_estimator="grpo", response_length=5, temperature=1.0,
                     num_ppo_epochs=1, num_mini_batches=1, kl_coef=0.0, disable_tqdm=True, report_to=[],
                     plot=False, save_final=False)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny_policy(tokenizer, hidden_size=32, layers=1),
                         reward_model=lambda p, c: [float(len(x.split())) for x in c],
                         train_dataset=[{"prompt": p} for p, _ in task.all_prompts()[:8]])
    exp = trainer.make_experience(trainer._prompt_batch(0))
    assert exp["is_weights"] is None and exp["engine_metrics"] == {}  # hf: nothing to correct
    plain = trainer.update(exp)
    exp["is_weights"] = torch.full_like(exp["mask"], 0.5)
    weighted = trainer.update(exp)
    assert plain["grad_norm"] > 0
    assert weighted["grad_norm"] == pytest.approx(0.5 * plain["grad_norm"], rel=1e-4)


def test_vllm_engine_with_lora_adapters_is_refused(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    from rlhf_fast import PPOConfig, PPOTrainer
    from rlhf_fast.demo.model import tiny_policy

    args = PPOConfig(output_dir=str(tmp_path), rollout_engine="vllm", advantage_estimator="grpo", num_generations=2,
                     disable_tqdm=True, report_to=[], plot=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="rollout_engine='vllm' .* cannot take LoRA / PEFT adapters"):
        PPOTrainer(args=args, processing_class=tokenizer, model=tiny_policy(tokenizer, hidden_size=32, layers=1),
                   reward_model=lambda p, c: [0.0] * len(c), train_dataset=[{"prompt": "anna asks : review the food"}],
                   peft_config=lora)
