"""GRPO-family options against direct computations: scale_rewards, Dr. GRPO's constant normaliser, REINFORCE++,
GSPO in the trainer, mask_truncated_completions, DAPO's overlong punishment and dynamic sampling."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import PPOConfig, PPOTrainer, ops  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.trainers import advantages as A  # noqa: E402
from rlhf_fast.trainers.dynamic_sampling import ScoredRollout, fill_batch  # noqa: E402
from rlhf_fast.rollout.generation import Generation  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)
PROMPTS = [p for p, _ in task.all_prompts()[:16]]


def tiny(tokenizer, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2))


def args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-3, per_device_train_batch_size=4,
                  response_length=6, temperature=1.0, num_ppo_epochs=1, num_mini_batches=2, seed=2,
                  advantage_estimator="grpo", num_generations=2, max_tokens_per_micro_batch=64, kl_coef=0.0, **QUIET)
    values.update(overrides)
    return PPOConfig(**values)


def words(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def trainer_for(tokenizer, tmp_path, reward=words, data=None, **overrides):
    return PPOTrainer(args=args(tmp_path, **overrides), processing_class=tokenizer, model=tiny(tokenizer),
                      reward_model=reward, train_dataset=data or [{"prompt": p} for p in PROMPTS])


# ---- advantages, directly ----------------------------------------------------------------------------------------
def test_scale_rewards_against_a_direct_computation():
    r = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])  # two groups of three
    g1, g2 = r[:3], r[3:]
    centred = torch.cat([g1 - g1.mean(), g2 - g2.mean()])
    group_std = torch.cat([g1.std().repeat(3), g2.std().repeat(3)])
    torch.testing.assert_close(A.group_advantages(r, 3, "grpo", "group"), centred / (group_std + 1e-4))
    torch.testing.assert_close(A.group_advantages(r, 3, "grpo", "batch"), centred / (r.std() + 1e-4))
    torch.testing.assert_close(A.group_advantages(r, 3, "grpo", "none"), centred)
    loo = torch.tensor([1 - 3, 2 - 2.5, 4 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    torch.testing.assert_close(A.group_advantages(r, 3, "rloo"), loo)


def test_reinforce_pp_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0]], dtype=torch.float32)
    gamma = 0.9
    returns = torch.zeros_like(rewards)
    for row in range(3):  # discounted return over the row's valid tokens, from the end
        running = 0.0
        for t in reversed(range(6)):
            if mask[row, t]:
                running = rewards[row, t] + gamma * running
                returns[row, t] = running
    valid = returns[mask.bool()]
    expected = torch.where(mask.bool(), (returns - valid.mean()) / torch.sqrt(valid.var() + 1e-8), 0.0)
    torch.testing.assert_close(A.reinforce_pp_advantages(rewards, mask, gamma), expected, atol=1e-5, rtol=1e-5)


def test_overlong_penalty_against_the_dapo_formula():
    lengths = torch.tensor([0, 10, 12, 13, 16, 20])
    expected = [0.0 if n <= 12 else -0.5 * min(1.0, (n - 12) / 8) for n in lengths.tolist()]
    torch.testing.assert_close(A.overlong_penalty(lengths, 20, 8, 0.5), torch.tensor(expected))


def _rollout(prompts, scores, group_size=2):
    rows = len(scores)
    gen = Generation([[p] for p in prompts for _ in range(group_size)], [[i] for i in range(rows)], [True] * rows)
    scores = torch.tensor(scores, dtype=torch.float32)
    return ScoredRollout(list(prompts), gen, [str(i) for i in range(rows)], scores[:, None], scores, group_size)


def test_fill_batch_keeps_informative_groups_and_tops_up():
    first = _rollout([0, 1, 2], [1, 1, 0, 1, 2, 2])  # only prompt 1 has unequal rewards
    extra = {1: _rollout([3, 4, 5], [0, 1, 5, 5, 1, 0]), 2: _rollout([6, 7, 8], [3, 3, 3, 3, 3, 3])}
    batch, metrics = fill_batch(first, lambda r: extra[r], max_rounds=2)
    assert batch.prompt_indices == [1, 3, 5]
    assert metrics == {"dynamic_sampling/rounds": 1.0, "dynamic_sampling/informative_frac": 3 / 6,
                       "dynamic_sampling/filled_groups": 0.0}
    batch, metrics = fill_batch(_rollout([0, 1, 2], [1, 1, 0, 1, 2, 2]), lambda r: extra[2], max_rounds=1)
    assert batch.prompt_indices == [1, 0, 2]  # one round gave nothing: topped up with the dropped groups
    assert metrics["dynamic_sampling/filled_groups"] == 2.0 and metrics["dynamic_sampling/rounds"] == 1.0
    torch.testing.assert_close(batch.scores, torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 2.0]))
    assert batch.gen.response_ids == [[2], [3], [0], [1], [4], [5]]


# ---- in the trainer ----------------------------------------------------------------------------------------------
def test_dr_grpo_divides_by_a_constant(tokenizer, tmp_path, monkeypatch):
    """seq-mean-token-sum-norm gets response_length (or loss_scale_factor) at every step, whatever the width."""
    seen = []
    original = ops.fused_ppo_loss

    def recording(*a, **k):
        seen.append((k["loss_scale"], a[0].shape[1]))
        return original(*a, **k)

    monkeypatch.setattr(ops, "fused_ppo_loss", recording)
    trainer = trainer_for(tokenizer, tmp_path, loss_agg="seq-mean-token-sum-norm", scale_rewards="none",
                          max_steps=2)
    trainer.train()
    assert {scale for scale, _ in seen} == {6.0}
    assert len({width for _, width in seen}) > 1  # the padded width changed, the divisor did not
    seen.clear()
    trainer_for(tokenizer, tmp_path, loss_agg="seq-mean-token-sum-norm", loss_scale_factor=100.0).train()
    assert {scale for scale, _ in seen} == {100.0}


def test_grpo_scale_rewards_in_the_trainer(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path, scale_rewards="none", num_generations=4)
    trainer.train()
    exp = trainer.last_experience
    groups = exp["scores"].view(-1, 4)
    expected = (groups - groups.mean(-1, keepdim=True)).reshape(-1, 1) * exp["mask"]
    torch.testing.assert_close(exp["advantages"], expected)


def test_reinforce_pp_in_the_trainer(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path, advantage_estimator="reinforce_pp", num_generations=1, kl_coef=0.1,
                          per_device_train_batch_size=6)
    metrics = trainer.train()[-1]
    exp = trainer.last_experience
    mask = exp["mask"]
    last = (mask.cumsum(-1) * mask).argmax(-1)
    rewards = -0.1 * ops.token_kl(exp["old_logp"], exp["ref_logp"], estimator="k1") * mask
    rewards[torch.arange(6), last] += exp["scores"]
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask  # gamma = 1: the rest of the row's rewards
    valid = returns[mask.bool()]
    expected = torch.where(mask.bool(), (returns - valid.mean()) / torch.sqrt(valid.var() + 1e-8), 0.0)
    torch.testing.assert_close(exp["advantages"], expected, atol=1e-5, rtol=1e-4)
    assert math.isfinite(metrics["pg_loss"]) and "vf_loss" not in metrics


def test_gspo_in_the_trainer(tokenizer, tmp_path, monkeypatch):
    levels = []
    original = ops.fused_ppo_loss
    monkeypatch.setattr(ops, "fused_ppo_loss",
                        lambda *a, **k: levels.append(k["importance_sampling_level"]) or original(*a, **k))
    trainer = trainer_for(tokenizer, tmp_path, importance_sampling_level="sequence", cliprange=3e-4,
                          cliprange_high=4e-4, num_ppo_epochs=2)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.train()[-1]
    assert set(levels) == {"sequence"} and math.isfinite(metrics["pg_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_mask_truncated_completions(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path, mask_truncated_completions=True, response_length=3,
                          num_generations=4, per_device_train_batch_size=4)
    trainer.train()
    exp = trainer.last_experience
    stopped = exp["stopped"].bool()
    assert stopped.any() and (~stopped).any()  # both kinds in the batch, so the test means something
    assert (exp["mask"][~stopped] == 0).all() and (exp["mask"][stopped].sum(-1) > 0).all()
    assert exp["host_mask_counts"] == exp["mask"].sum(-1).tolist()


def test_overlong_punishment_in_the_trainer(tokenizer, tmp_path):
    def zero(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = trainer_for(tokenizer, tmp_path, reward=zero, overlong_buffer_len=4, overlong_penalty_factor=2.0)
    trainer.train()
    exp = trainer.last_experience
    lengths = exp["response_lens"]
    expected = -2.0 * ((lengths - 2).clamp(min=0) / 4).clamp(max=1)
    torch.testing.assert_close(exp["scores"].cpu(), expected)


def test_dynamic_sampling_in_the_trainer(tokenizer, tmp_path):
    """Prompts whose answer column is even always score 1 (no signal): their groups must not be trained on."""
    data = [{"prompt": p, "answer": i % 2} for i, p in enumerate(PROMPTS)]

    def reward(completions, answer, **kwargs):
        return [1.0 if a == 0 else float(len(c.split())) + 0.01 * i for i, (c, a) in enumerate(zip(completions, answer))]

    trainer = trainer_for(tokenizer, tmp_path, reward=reward, data=data, dynamic_sampling=True,
                          dynamic_sampling_max_rounds=5)
    metrics = trainer.train()[-1]
    exp = trainer.last_experience
    assert len(exp["prompts"]) == 8
    assert all(PROMPTS.index(p) % 2 == 1 for p in exp["prompts"])
    assert metrics["dynamic_sampling/filled_groups"] == 0.0 and metrics["dynamic_sampling/rounds"] >= 1
    assert 0 < metrics["dynamic_sampling/informative_frac"] < 1


def test_config_checks_the_new_fields():
    for kwargs, message in ((dict(scale_rewards="std"), "scale_rewards: expected one of"),
                            (dict(importance_sampling_level="seq"), "importance_sampling_level"),
                            (dict(loss_scale_factor=0), r"loss_scale_factor: expected a value in \(0, inf\)"),
                            (dict(mask_truncated_completions=True, stop_token=None), "mask_truncated_completions"),
                            (dict(overlong_buffer_len=60), r"overlong_buffer_len: expected a value in \[0, "),
                            (dict(overlong_penalty_factor=-1), "overlong_penalty_factor"),
                            (dict(dynamic_sampling=True), "dynamic_sampling: needs groups"),
                            (dict(advantage_estimator="grpo", num_generations=2, dynamic_sampling_max_rounds=-1),
                             "dynamic_sampling_max_rounds")):
        with pytest.raises(ValueError, match=message):
            PPOConfig(**kwargs)
    assert PPOConfig(advantage_estimator="reinforce_pp").num_generations == 1
