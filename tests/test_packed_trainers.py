"""Trainers on packed micro-batches (padding_free) equal the padded ones, and both equal each sequence run alone.

fp32, tiny Llama models with the demo tokenizer: SFT loss and gradients, reward-model scores and gradients, and
for PPO (critic, value head, log-probs from hidden states, GRPO, RLOO; every aggregation mode) the rollout's
log-probs, values, rewards and advantages, one micro-batch's loss, statistics and the gradients of every trained
parameter, and the parameters after a whole update."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import (DPOConfig, DPOTrainer, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig,  # noqa: E402
                       SFTTrainer, ops)
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.reference.losses import AGG_MODES  # noqa: E402
from rlhf_fast.trainers.heads import scalar_per_token  # noqa: E402
from rlhf_fast.trainers.sampling import truncate_logits  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=[], plot=False, save_final=False)
PROMPTS = [p for p, _ in task.all_prompts()[:8]]
TIGHT = dict(atol=2e-5, rtol=2e-5)


def tiny(tokenizer, kind="lm", seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=2, heads=2)
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    return cls(config)


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_sft_packed_equals_padded_and_each_example_alone(tokenizer, tmp_path):
    completions = ["the room was great .", "the pool was fine and the staff was rude .", "the soup was good ."]
    data = [{"prompt": PROMPTS[i], "completion": completions[i % 3]} for i in range(6)]
    model = tiny(tokenizer)
    results = {}
    for padding_free in (False, True):
        trainer = SFTTrainer(model=copy.deepcopy(model), processing_class=tokenizer, train_dataset=data,
                             args=SFTConfig(output_dir=str(tmp_path), max_steps=1, padding_free=padding_free, **QUIET))
        assert trainer.packed is padding_free
        loss, count = trainer.compute_loss(trainer.train_examples)
        loss.backward()
        results[padding_free] = (loss.detach(), count, _grads(list(trainer.model.parameters())))
    (loss, count, grads), (ploss, pcount, pgrads) = results[False], results[True]
    assert count == pcount
    torch.testing.assert_close(ploss, loss, **TIGHT)
    for g, pg in zip(grads, pgrads):
        torch.testing.assert_close(pg, g, **TIGHT)
    # independent: each example alone through the model
    nll, tokens = 0.0, 0
    for ids, prompt_len in trainer.train_examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        logp = ops.selective_log_softmax(logits, torch.tensor(ids[1:]))
        nll -= float(logp[prompt_len - 1:].sum())
        tokens += len(ids) - prompt_len
    assert float(ploss) == pytest.approx(nll / tokens, rel=1e-5)


@pytest.mark.parametrize("from_hidden", [True, False], ids=["from_hidden", "logits"])
def test_dpo_packed_equals_padded_and_each_pair_alone(tokenizer, tmp_path, from_hidden):
    answers = ["the room was great .", "the pool was fine and the staff was rude .", "the soup was bad ."]
    data = [{"prompt": PROMPTS[i], "chosen": answers[i % 3], "rejected": answers[(i + 1) % 3]} for i in range(6)]
    model, ref = tiny(tokenizer), tiny(tokenizer, seed=1)  # a different reference: the loss is not log 2
    beta = 0.5
    results = {}
    for padding_free in (False, True):
        args = DPOConfig(output_dir=str(tmp_path), max_steps=1, padding_free=padding_free, beta=beta,
                         logprobs_from_hidden=from_hidden, **QUIET)
        trainer = DPOTrainer(copy.deepcopy(model), copy.deepcopy(ref), args=args, train_dataset=data,
                             processing_class=tokenizer)
        assert trainer.packed is padding_free
        loss, stats, tokens = trainer.compute_loss(trainer.train_pairs, float(len(data)))
        loss.backward()
        results[padding_free] = (loss.detach(), stats, tokens, _grads(list(trainer.model.parameters())))
    (loss, stats, tokens, grads), (ploss, pstats, ptokens, pgrads) = results[False], results[True]
    assert int(tokens) == int(ptokens)
    torch.testing.assert_close(ploss, loss, **TIGHT)
    for key in stats:
        torch.testing.assert_close(pstats[key], stats[key], **TIGHT)
    for g, pg in zip(grads, pgrads):
        torch.testing.assert_close(pg, g, **TIGHT)

    def completion_logp(net, ids, prompt_len):  # one sequence alone, no padding
        with torch.no_grad():
            logits = net(input_ids=torch.tensor([ids])).logits[0, :-1]
        return float(ops.selective_log_softmax(logits, torch.tensor(ids[1:]))[prompt_len - 1:].sum())

    expected = 0.0
    for prompt_len, chosen, rejected in trainer.train_pairs:
        margin = (completion_logp(model, chosen, prompt_len) - completion_logp(ref, chosen, prompt_len)
                  - completion_logp(model, rejected, prompt_len) + completion_logp(ref, rejected, prompt_len))
        expected -= float(torch.nn.functional.logsigmoid(torch.tensor(beta * margin)))
    assert float(ploss) == pytest.approx(expected / len(data), rel=1e-5)


def test_reward_packed_equals_padded_and_the_models_own_score(tokenizer, tmp_path):
    pairs = [{"prompt": p, "chosen": "the room was great .", "rejected": "the room was awful and the pool was bad ."}
             for p in PROMPTS[:5]]
    model = tiny(tokenizer, "rm")
    results = {}
    for padding_free in (False, True):
        trainer = RewardTrainer(model=copy.deepcopy(model), processing_class=tokenizer, train_dataset=pairs,
                                args=RewardConfig(output_dir=str(tmp_path), max_steps=1, padding_free=padding_free,
                                                  center_rewards_coefficient=0.1, **QUIET))
        assert trainer.packed is padding_free
        chosen, rejected = trainer.rewards(trainer.train_pairs)
        loss, _ = trainer.compute_loss(trainer.train_pairs)
        loss.backward()
        results[padding_free] = (chosen.detach(), rejected.detach(), loss.detach(),
                                 _grads(list(trainer.model.parameters())))
    for a, b in zip(results[False][:3], results[True][:3]):
        torch.testing.assert_close(b, a, **TIGHT)
    for g, pg in zip(results[False][3], results[True][3]):
        torch.testing.assert_close(pg, g, **TIGHT)
    # independent: the sequence-classification model's own pooled score of each sequence alone
    with torch.no_grad():
        own = [float(model(input_ids=torch.tensor([p[0]])).logits[0, 0]) for p in trainer.train_pairs]
    assert results[True][0].tolist() == pytest.approx(own, abs=1e-5)


PPO_CASES = {
    "critic": dict(advantage_estimator="gae"),
    "value_head": dict(advantage_estimator="gae", critic="value_head"),
    "value_head_from_hidden": dict(advantage_estimator="gae", critic="value_head", logprobs_from_hidden=True),
    "critic_from_hidden": dict(advantage_estimator="gae", logprobs_from_hidden=True, kl_penalty="loss"),
    "grpo": dict(advantage_estimator="grpo", num_generations=2, entropy_coef=0.01),
    "rloo": dict(advantage_estimator="rloo", num_generations=2, kl_penalty="loss"),
    # GSPO: one ratio per sequence, taken per sequence of the packed row
    "gspo": dict(advantage_estimator="grpo", num_generations=2, importance_sampling_level="sequence"),
    "gspo_from_hidden": dict(advantage_estimator="grpo", num_generations=2, importance_sampling_level="sequence",
                             logprobs_from_hidden=True),
    # truncated sampling: the truncation runs per position of the packed row's logits
    "top_k": dict(advantage_estimator="grpo", num_generations=2, top_k=5),
}


def _ppo(tokenizer, tmp_path, models, padding_free, overrides):
    policy, rm = models
    args = PPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, response_length=12,
                     num_ppo_epochs=1, max_tokens_per_micro_batch=48, padding_free=padding_free, learning_rate=1e-3,
                     temperature=1.0, **overrides, **QUIET)
    return PPOTrainer(args=args, processing_class=tokenizer, model=copy.deepcopy(policy),
                      reward_model=copy.deepcopy(rm), train_dataset=[{"prompt": p} for p in PROMPTS])


@pytest.mark.parametrize("case", list(PPO_CASES))
def test_ppo_packed_equals_padded(tokenizer, tmp_path, case):
    models = (tiny(tokenizer), tiny(tokenizer, "rm", seed=1))
    overrides = PPO_CASES[case]
    padded = _ppo(tokenizer, tmp_path, models, False, overrides)
    exp = padded.make_experience(padded._prompt_batch(0))
    packed = _ppo(tokenizer, tmp_path, models, True, overrides)
    assert (padded.packed, packed.packed) == (False, True)
    packed._generate_global = lambda prompt_ids: _same_rollouts(exp)  # the same sampled responses
    pexp = packed.make_experience(packed._prompt_batch(0))
    assert pexp["sequences"] == exp["sequences"]
    assert len(packed._plan(exp["host_lengths"])) > 1  # several micro-batches
    for key in ("old_logp", "ref_logp", "values", "scores", "advantages", "returns", "kl"):
        if exp[key] is not None:
            torch.testing.assert_close(pexp[key], exp[key], **TIGHT, msg=key)
    _check_against_each_sequence_alone(models, exp, overrides)

    rows = list(range(len(exp["sequences"])))
    tokens = float(sum(exp["host_mask_counts"]))
    for agg in AGG_MODES:  # the experience does not depend on the aggregation: one rollout, every mode
        results = {}
        for name, trainer, e in (("padded", padded, exp), ("packed", packed, pexp)):
            trainer.args.loss_agg = agg
            for module in (trainer.policy_train, trainer.value_train):
                if module is not None:
                    module.train()
            for p in trainer.trainable:
                p.grad = None
            stats, losses, count = trainer._micro_batch_loss(e, rows, tokens, len(rows))
            results[name] = (stats, losses, count, _grads(trainer.trainable))
        (stats, losses, count, grads), (pstats, plosses, pcount, pgrads) = results["padded"], results["packed"]
        assert float(count) == float(pcount)
        for key in stats:
            torch.testing.assert_close(pstats[key], stats[key], **TIGHT, msg=f"{agg} {key}")
        for key in losses:
            torch.testing.assert_close(plosses[key], losses[key], **TIGHT, msg=f"{agg} {key}")
        assert len(grads) == len(packed.trainable) and all(float(g.abs().sum()) > 0 for g in grads[-2:])
        for g, pg in zip(grads, pgrads):
            torch.testing.assert_close(pg, g, atol=5e-5, rtol=5e-5, msg=agg)


def _same_rollouts(exp):
    from rlhf_fast.rollout.generation import Generation

    lens = exp["response_lens"].long().tolist()
    sequences = exp["sequences"]
    prompts = [s[: len(s) - n] for s, n in zip(sequences, lens)]
    return Generation(prompts, [s[len(p):] for s, p in zip(sequences, prompts)], exp["stopped"].bool().tolist())


def _check_against_each_sequence_alone(models, exp, overrides):
    """Old log-probs and rewards of each sequence run alone through the unwrapped models (no batching at all)."""
    policy, rm = models
    with torch.no_grad():
        for row, seq in enumerate(exp["sequences"]):
            ids = torch.tensor([seq])
            logits = truncate_logits(policy(input_ids=ids).logits[0, :-1], temperature=1.0, top_p=1.0,
                                     top_k=overrides.get("top_k", 0))
            logp = ops.selective_log_softmax(logits, ids[0, 1:], temperature=1.0)
            mask = exp["mask"][row, : len(seq) - 1]
            torch.testing.assert_close(exp["old_logp"][row, : len(seq) - 1], logp * mask, **TIGHT)
            score = scalar_per_token(rm, ids, torch.ones_like(ids))[0, -1]
            if overrides.get("advantage_estimator") == "gae" and "critic" not in overrides:
                values = scalar_per_token(rm, ids, torch.ones_like(ids))[0, :-1]  # the critic starts as the RM
                torch.testing.assert_close(exp["values"][row, : len(seq) - 1], values * mask, **TIGHT)
            torch.testing.assert_close(exp["scores"][row], score, **TIGHT)


@pytest.mark.parametrize("case", ["critic", "value_head_from_hidden"])
def test_ppo_update_packed_equals_padded(tokenizer, tmp_path, case):
    """A whole update (two minibatches, several micro-batches each): the same parameters after it."""
    models = (tiny(tokenizer), tiny(tokenizer, "rm", seed=1))
    overrides = dict(PPO_CASES[case], num_mini_batches=2, loss_agg="seq-mean-token-mean")
    padded = _ppo(tokenizer, tmp_path, models, False, overrides)
    exp = padded.make_experience(padded._prompt_batch(0))
    torch.manual_seed(3)
    padded_stats = padded.update(exp)
    packed = _ppo(tokenizer, tmp_path, models, True, overrides)
    packed._generate_global = lambda prompt_ids: _same_rollouts(exp)
    pexp = packed.make_experience(packed._prompt_batch(0))
    torch.manual_seed(3)
    packed_stats = packed.update(pexp)
    for key in padded_stats:
        assert packed_stats[key] == pytest.approx(padded_stats[key], rel=1e-4, abs=1e-6), key
    for p, q in zip(padded.trainable, packed.trainable):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_padding_free_true_refuses_a_model_that_cannot_be_packed(tokenizer, tmp_path, caplog):
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0, pad_token_id=tokenizer.pad_token_id))
    data = [{"prompt": PROMPTS[0], "completion": "the room was great ."}]
    with pytest.raises(ValueError, match="padding_free: model \\(Gemma2ForCausalLM\\) cannot run on packed rows"):
        SFTTrainer(model=gemma, processing_class=tokenizer, train_dataset=data,
                   args=SFTConfig(output_dir=str(tmp_path), max_steps=1, padding_free=True, **QUIET))
    trainer = SFTTrainer(model=gemma, processing_class=tokenizer, train_dataset=data,
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, **QUIET))
    assert trainer.packed is False  # auto: padded, with one log line


@pytest.mark.parametrize("case", ["value_head_from_hidden", "critic"])
def test_gradient_checkpointing_on_packed_rows_gives_the_same_gradients(tokenizer, tmp_path, case):
    models = (tiny(tokenizer), tiny(tokenizer, "rm", seed=1))
    plain = _ppo(tokenizer, tmp_path, models, True, PPO_CASES[case])
    exp = plain.make_experience(plain._prompt_batch(0))
    checkpointed = _ppo(tokenizer, tmp_path, models, True, dict(PPO_CASES[case], gradient_checkpointing=True))
    assert checkpointed.policy.is_activation_checkpointing
    rows = list(range(len(exp["sequences"])))
    tokens = float(sum(exp["host_mask_counts"]))
    grads = []
    for trainer in (plain, checkpointed):
        for module in (trainer.policy_train, trainer.value_train):
            if module is not None:
                module.train()
        trainer._micro_batch_loss(exp, rows, tokens, len(rows))
        grads.append(_grads(trainer.trainable))
    for g, cg in zip(*grads):
        torch.testing.assert_close(cg, g, atol=1e-6, rtol=1e-6)


def test_padding_free_and_gradient_checkpointing_config_fields():
    assert PPOConfig.from_dict({"padding_free": "false"}).padding_free is False
    assert SFTConfig.from_dict({"padding_free": True}).padding_free is True
    assert RewardConfig().padding_free == "auto" and RewardConfig().gradient_checkpointing is False
    with pytest.raises(ValueError, match="padding_free: expected auto, true or false, got 'yes'"):
        SFTConfig(padding_free="yes")
    with pytest.raises(ValueError, match="gradient_checkpointing: expected a bool"):
        SFTConfig(gradient_checkpointing="sometimes")
