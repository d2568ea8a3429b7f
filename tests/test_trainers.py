"""Trainers on tiny Llama models with the demo tokenizer: losses fall, PPO learns, resume is exact, errors are clear."""
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.trainers.data import load_jsonl  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)
TIMING_KEYS = {"tokens_per_s", "time_generate_s", "time_score_s", "time_train_s", "step_time_s"}


def tiny(tokenizer, kind="lm", seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    return cls(config)


PROMPTS = [p for p, _ in task.all_prompts()[:16]]


def test_sft_loss_falls_on_a_fixed_batch(tokenizer, tmp_path):
    data = [{"prompt": PROMPTS[i], "completion": "the room was great and the pool was fine ."} for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=25, learning_rate=1e-2, per_device_train_batch_size=8, **QUIET)
    history = SFTTrainer(model=tiny(tokenizer), args=args, train_dataset=data, processing_class=tokenizer).train()
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]


def test_sft_loss_counts_completion_tokens_only(tokenizer, tmp_path):
    data = [{"prompt": PROMPTS[0], "completion": "the room was great ."}]
    trainer = SFTTrainer(model=tiny(tokenizer), args=SFTConfig(output_dir=str(tmp_path), max_steps=1, **QUIET),
                         train_dataset=data, processing_class=tokenizer)
    ids, _, loss_mask = trainer._collate(trainer.train_examples)
    prompt_len = trainer.train_examples[0][1]
    assert loss_mask[0, : prompt_len - 1].sum() == 0  # no label inside the prompt
    assert int(loss_mask.sum()) == ids.shape[1] - prompt_len  # completion words + EOS


def test_reward_loss_falls_and_ranks_pairs(tokenizer, tmp_path):
    pairs = [{"prompt": p, "chosen": "the room was great .", "rejected": "the room was awful ."} for p in PROMPTS[:8]]
    args = RewardConfig(output_dir=str(tmp_path), max_steps=20, learning_rate=1e-2, per_device_train_batch_size=8,
                        center_rewards_coefficient=0.01, **QUIET)
    trainer = RewardTrainer(model=tiny(tokenizer, "rm"), args=args, train_dataset=pairs, eval_dataset=pairs,
                            processing_class=tokenizer)
    history = trainer.train()
    assert history[-2]["loss"] < 0.5 * history[0]["loss"]
    assert trainer.evaluate()["eval_accuracy"] == 1.0


def positive_fraction(prompts, completions):
    """A simple reward function: the share of positive adjectives among the response words."""
    return [sum(w in task.POSITIVE for w in c.split()) / max(1, len(c.split())) for c in completions]


def ppo_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=2, learning_rate=3e-3, per_device_train_batch_size=8,
                  response_length=6, temperature=1.0, num_ppo_epochs=2, num_mini_batches=2, seed=3,
                  max_tokens_per_micro_batch=64, **QUIET)
    values.update(overrides)
    return PPOConfig(**values)


def test_ppo_raises_the_reward_of_a_reward_function(tokenizer, tmp_path):
    args = ppo_args(tmp_path, max_steps=30, advantage_estimator="rloo", num_generations=4, learning_rate=1e-2,
                    kl_coef=0.0, per_device_train_batch_size=4, num_ppo_epochs=1, num_mini_batches=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), reward_model=positive_fraction,
                         train_dataset=[{"prompt": p} for p in PROMPTS])
    history = trainer.train()
    first = sum(r["reward"] for r in history[:5]) / 5
    last = sum(r["reward"] for r in history[-5:]) / 5
    assert last > first + 0.1, (first, last)


@pytest.mark.parametrize("overrides", [
    dict(),  # gae with a critic, kl in the reward
    dict(kl_penalty="loss", kl_estimator="k3", entropy_coef=0.01),
    dict(advantage_estimator="grpo", num_generations=2),
    dict(target_kl=0.01, kl_horizon=100),
    dict(logprobs_from_hidden=True),
    dict(loss_agg="seq-mean-token-sum-norm", missing_eos_penalty=1.0, eval_steps=1),
    dict(critic="value_head"),
    dict(critic="value_head", logprobs_from_hidden=True, kl_penalty="loss", entropy_coef=0.01),
], ids=["gae", "kl-in-loss", "grpo", "adaptive-kl", "from-hidden", "seq-agg-eval", "value-head",
        "value-head-from-hidden"])
def test_ppo_variants_step(tokenizer, tmp_path, overrides):
    args = ppo_args(tmp_path, max_steps=1, **overrides)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), reward_model=tiny(tokenizer, "rm"),
                         train_dataset=[{"prompt": p} for p in PROMPTS], eval_dataset=[{"prompt": p} for p in PROMPTS[:3]])
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.train()[-1]
    for key in ("reward", "kl", "entropy", "clip_frac", "approx_kl", "pg_loss", "response_length", "tokens_per_s"):
        assert math.isfinite(metrics[key]), key
    assert ("vf_loss" in metrics) == (args.advantage_estimator == "gae")
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    assert "eval_reward" in metrics  # an eval_dataset is always evaluated at the end
    if "target_kl" in overrides:
        assert trainer.kl_coef != args.kl_coef


def test_ppo_value_head_raises_the_reward_of_a_reward_function(tokenizer, tmp_path):
    """GAE with the critic as a value head on the policy's body (no value_model): the reward goes up."""
    args = ppo_args(tmp_path, max_steps=30, critic="value_head", kl_coef=0.0, learning_rate=1e-2, vf_coef=0.5,
                    per_device_train_batch_size=16, num_ppo_epochs=1, num_mini_batches=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), reward_model=positive_fraction,
                         train_dataset=[{"prompt": p} for p in PROMPTS])
    assert trainer.value_model is None and trainer.value_head is not None
    history = trainer.train()
    first = sum(r["reward"] for r in history[:5]) / 5
    last = sum(r["reward"] for r in history[-5:]) / 5
    assert last > first + 0.1, (first, last)


@pytest.mark.parametrize("from_hidden", [False, True], ids=["logits", "from-hidden"])
def test_ppo_value_head_learns_the_returns(tokenizer, tmp_path, from_hidden):
    """A constant reward of 1 (no KL, gamma 1): every return is 1, so the head's value loss must fall; the
    policy and the head move, the reference does not, and each scoring micro-batch runs the policy once for
    both the old log-probs and the values."""
    args = ppo_args(tmp_path, max_steps=12, critic="value_head", kl_coef=0.0, learning_rate=1e-2, vf_coef=1.0,
                    cliprange_value=None, logprobs_from_hidden=from_hidden)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer),
                         reward_model=lambda prompts, completions: [1.0] * len(completions),
                         train_dataset=[{"prompt": p} for p in PROMPTS])
    runner = trainer.policy_train
    assert runner.value_head is trainer.value_head and "value_head.weight" in dict(runner.named_parameters())
    assert not hasattr(trainer.policy, "value_head")  # the model itself stays a plain causal LM
    assert not any(name.startswith("value_head") for name, _ in trainer.ref_model.named_parameters())
    assert {id(p) for p in trainer.value_head.parameters()} <= {id(p) for g in trainer.optimizer.param_groups
                                                                  for p in g["params"]}
    policy_before = [p.detach().clone() for p in trainer.policy.parameters()]
    head_before = [p.detach().clone() for p in trainer.value_head.parameters()]
    ref_before = [p.detach().clone() for p in trainer.ref_model.parameters()]
    history = trainer.train()
    calls = []
    hook = runner.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    exp = trainer.make_experience(trainer._prompt_batch(0))
    hook.remove()
    assert len(calls) == len(trainer._plan(exp["lengths"].tolist())) > 0  # one forward per micro-batch
    assert exp["values"].abs().sum() > 0
    first, last = history[0]["vf_loss"], sum(r["vf_loss"] for r in history[-3:]) / 3
    assert last < 0.1 * first, [r["vf_loss"] for r in history]
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, trainer.policy.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(head_before, trainer.value_head.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ref_before, trainer.ref_model.parameters()))


@pytest.mark.parametrize("from_hidden", [False, True], ids=["logits", "from-hidden"])
def test_ppo_value_head_resume_equals_uninterrupted_run(tokenizer, tmp_path, from_hidden):
    from safetensors.torch import load_file

    def make(out, **overrides):
        return PPOTrainer(args=ppo_args(out, **{"max_steps": 4, "critic": "value_head",
                                                "logprobs_from_hidden": from_hidden, **overrides}),
                          processing_class=tokenizer, model=tiny(tokenizer), reward_model=tiny(tokenizer, "rm", seed=1),
                          train_dataset=[{"prompt": p} for p in PROMPTS])

    full = make(tmp_path / "full")
    full_history = full.train()
    interrupted = make(tmp_path / "part", save_steps=2)
    interrupted.num_ppo_steps = 2
    interrupted.train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert not (checkpoint / "value_model").exists()
    # the policy's folder stays a plain causal LM; the head is saved beside it
    saved = load_file(checkpoint / "model" / "model.safetensors")
    assert not [k for k in saved if "value_head" in k]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    for (name, a), b in zip(reloaded.state_dict().items(), interrupted.policy.state_dict().values()):
        assert torch.equal(a, b), name
    head = load_file(checkpoint / "model" / "value_head.safetensors")
    assert sorted(head) == ["bias", "weight"]
    assert all(torch.equal(head[k], v) for k, v in interrupted.value_head.state_dict().items())

    torch.manual_seed(1234)
    resumed = make(tmp_path / "resumed", resume_from=str(checkpoint))
    assert resumed.global_step == 2
    assert all(torch.equal(head[k], v) for k, v in resumed.value_head.state_dict().items())  # restored by DCP
    resumed_history = resumed.train()
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(full.value_head.parameters(), resumed.value_head.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(head[k], v) for k, v in full.value_head.state_dict().items())  # it kept training
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h]  # noqa: E731
    assert strip(resumed_history) == strip(full_history)
    assert "vf_loss" in full_history[-1]


def test_ppo_resume_equals_uninterrupted_run(tokenizer, tmp_path):
    def make(out, **overrides):
        return PPOTrainer(args=ppo_args(out, **{"max_steps": 4, **overrides}), processing_class=tokenizer,
                          model=tiny(tokenizer), reward_model=tiny(tokenizer, "rm", seed=1),
                          train_dataset=[{"prompt": p} for p in PROMPTS])

    full = make(tmp_path / "full")
    full_history = full.train()
    interrupted = make(tmp_path / "part", save_steps=2)
    interrupted.num_ppo_steps = 2  # same schedule as the full run, stopped after step 2
    interrupted.train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert (checkpoint / "model" / "model.safetensors").is_file()
    assert (checkpoint / "value_model" / "model.safetensors").is_file()
    assert not [p for p in os.listdir(tmp_path / "part") if ".tmp" in p]  # written atomically

    torch.manual_seed(1234)  # the checkpoint's RNG state must win over whatever the process did since
    resumed = make(tmp_path / "resumed", resume_from=str(checkpoint))
    assert resumed.global_step == 2
    resumed_history = resumed.train()
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(full.value_model.parameters(), resumed.value_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h]  # noqa: E731
    assert strip(resumed_history) == strip(full_history)


def test_sft_resume_equals_uninterrupted_run(tokenizer, tmp_path):
    data = [{"prompt": p, "completion": "the story was good ."} for p in PROMPTS]

    def make(out, steps, **kw):
        return SFTTrainer(model=tiny(tokenizer), args=SFTConfig(output_dir=str(out), max_steps=steps, learning_rate=1e-2,
                                                                 per_device_train_batch_size=4, **QUIET, **kw),
                          train_dataset=data, processing_class=tokenizer)

    full = make(tmp_path / "full", 6)
    full.train()
    part = make(tmp_path / "part", 6, save_steps=3)
    part.num_training_steps = 3
    part.train()
    resumed = make(tmp_path / "resumed", 6, resume_from=str(tmp_path / "part" / "checkpoint-3"))
    resumed.train()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_generations >= 2"):
        PPOConfig(advantage_estimator="grpo", num_generations=1)
    with pytest.raises(ValueError, match="advantage_estimator"):
        PPOConfig(advantage_estimator="ppo2")
    with pytest.raises(ValueError, match="num_mini_batches=3"):
        PPOConfig(per_device_train_batch_size=8, num_mini_batches=3)
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        SFTConfig.from_dict({"learning_rat": 1e-3})
    with pytest.raises(ValueError, match="learning_rate"):
        RewardConfig(learning_rate=0)
    with pytest.raises(ValueError, match="critic"):
        PPOConfig(critic="shared")
    with pytest.raises(ValueError, match="critic='value_head' needs advantage_estimator='gae'"):
        PPOConfig(critic="value_head", advantage_estimator="rloo", num_generations=2)


def test_ppo_value_head_refuses_a_value_model(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="value_model: critic='value_head'"):
        PPOTrainer(args=ppo_args(tmp_path, critic="value_head"), processing_class=tokenizer, model=tiny(tokenizer),
                   reward_model=positive_fraction, value_model=tiny(tokenizer, "rm"), train_dataset=[{"prompt": "x"}])


def test_ppo_needs_a_critic_for_gae_with_a_reward_function(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="value_model"):
        PPOTrainer(args=ppo_args(tmp_path), processing_class=tokenizer, model=tiny(tokenizer),
                   reward_model=positive_fraction, train_dataset=[{"prompt": "x"}])


def test_ppo_yaml_with_a_value_head(tokenizer, tmp_path):
    """`rlhf-fast ppo` configs: critic: value_head loads no critic model, and refuses a value_model path."""
    from rlhf_fast.trainers.from_config import build_trainer

    for name, model in (("policy", tiny(tokenizer)), ("rm", tiny(tokenizer, "rm"))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "ppo.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS[:4]))
    text = ("model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\ncritic: value_head\nmax_steps: 1\noutput_dir: out\n"
            "per_device_train_batch_size: 4\ndisable_tqdm: true\nplot: false\nreport_to: [jsonl]\n")
    (tmp_path / "ppo.yaml").write_text(text)
    trainer = build_trainer("ppo", str(tmp_path / "ppo.yaml"))
    assert trainer.value_model is None and trainer.value_head is not None
    (tmp_path / "bad.yaml").write_text(text + "value_model: rm\n")
    with pytest.raises(ValueError, match="bad.yaml: value_model cannot be used with critic: value_head"):
        build_trainer("ppo", str(tmp_path / "bad.yaml"))


def test_bad_data_is_reported_with_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: b}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: invalid JSON"):
        load_jsonl(str(path), "sft")
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:3: missing field 'completion'"):
        load_jsonl(str(path), "sft")
    path.write_text('{"prompt": "a", "chosen": 1, "rejected": "c"}\n')
    with pytest.raises(ValueError, match=r"field 'chosen' must be a string"):
        load_jsonl(str(path), "rm")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(str(tmp_path / "nope.jsonl"), "ppo")


def test_import_rlhf_fast_does_not_import_transformers():
    code = "import sys, rlhf_fast; assert 'transformers' not in sys.modules; rlhf_fast.PPOTrainer"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- regression tests of the review (dropout, generation settings, loss counts, steps, logging, truncation) -----
def gpt2_with_dropout(tokenizer, p=0.1, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return transformers.GPT2LMHeadModel(config).eval()  # as from_pretrained returns it


def frozen_policy_run(tokenizer, tmp_path, **overrides):
    """A policy that cannot move (lr 1e-30: below fp32 resolution), its own reference: every KL, ratio and clip
    statistic must be exactly 0 at every step, unless dropout draws different masks for the compared passes."""
    args = ppo_args(tmp_path, max_steps=3, learning_rate=1e-30, advantage_estimator="rloo", num_generations=2,
                    num_ppo_epochs=1, num_mini_batches=1, kl_coef=0.1, **overrides)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=gpt2_with_dropout(tokenizer),
                         reward_model=lambda p, c: [float(len(x)) for x in c],
                         train_dataset=[{"prompt": p} for p in PROMPTS])
    return trainer, trainer.train()


def test_ppo_disables_dropout_by_default(tokenizer, tmp_path):
    trainer, history = frozen_policy_run(tokenizer, tmp_path)
    assert [(r["kl"], r["approx_kl"], r["clip_frac"]) for r in history] == [(0.0, 0.0, 0.0)] * 3
    for model in (trainer.policy, distributed_unwrap(trainer.ref_model)):
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0


def test_ppo_scores_in_eval_mode_with_dropout_kept(tokenizer, tmp_path):
    """disable_dropout=False keeps dropout in the training forward, but the old log-probs are still computed in
    eval mode (after step 1 the policy is left in train mode by the update): the rollout KL stays exactly 0."""
    trainer, history = frozen_policy_run(tokenizer, tmp_path, disable_dropout=False)
    assert any(m.p == 0.1 for m in trainer.policy.modules() if isinstance(m, torch.nn.Dropout))
    assert [r["kl"] for r in history] == [0.0] * 3
    assert any(r["approx_kl"] > 0 for r in history)  # the training forward does use dropout


def test_reward_trainer_disables_dropout(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    config.attention_dropout = 0.3
    kept = transformers.LlamaForSequenceClassification(config.__class__.from_dict(config.to_dict()))
    model = transformers.LlamaForSequenceClassification(config)
    pairs = [{"prompt": PROMPTS[0], "chosen": "the room was great .", "rejected": "the room was bad ."}]
    RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path), max_steps=1, **QUIET), train_dataset=pairs,
                  processing_class=tokenizer)
    assert model.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    RewardTrainer(model=kept, args=RewardConfig(output_dir=str(tmp_path), max_steps=1, disable_dropout=False, **QUIET),
                  train_dataset=pairs, processing_class=tokenizer)
    assert kept.config.attention_dropout == 0.3


def distributed_unwrap(module):
    from rlhf_fast.trainers.distributed import unwrap

    return unwrap(module)


def test_generate_ignores_the_model_generation_config(tokenizer):
    """Only the trainer's settings apply: a checkpoint's generation_config (repetition penalty, n-gram blocking,
    top_k, min_new_tokens, suppressed tokens) must not change the samples."""
    from rlhf_fast.rollout.generation import generate

    model = tiny(tokenizer).eval()
    prompts = [[tokenizer.bos_token_id, 5, 6, 7]] * 8

    def sample(**settings):
        torch.manual_seed(0)
        return generate(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                        max_new_tokens=12, **settings).response_ids

    clean = {"sampled": sample(temperature=1.0), "greedy": sample(do_sample=False)}
    config = model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.top_k = 50.0, 1, 1
    config.min_new_tokens, config.suppress_tokens, config.min_p = 10, [9, 10, 11], 0.5
    assert sample(temperature=1.0) == clean["sampled"]
    assert sample(do_sample=False) == clean["greedy"]
    assert model.generation_config.repetition_penalty == 50.0  # the model's own config is left as it was


def test_generate_without_stop_token_never_stops_at_the_models_eos(tokenizer, tmp_path):
    """stop_token: null: the model's EOS is an ordinary token; every response has response_length sampled tokens
    and no padding is scored."""
    from rlhf_fast.rollout.generation import generate

    model = tiny(tokenizer).eval()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():  # make EOS likely, so that a model-side stop would show
        model.lm_head.weight[tokenizer.eos_token_id] *= 0
        model.lm_head.weight[tokenizer.eos_token_id] += model.lm_head.weight.mean(0) + 0.5
    torch.manual_seed(0)
    gen = generate(model, [[tokenizer.bos_token_id, 5, 6]] * 16, pad_id=tokenizer.pad_token_id, eos_id=None,
                   max_new_tokens=10)
    assert [len(r) for r in gen.response_ids] == [10] * 16 and not any(gen.stopped)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    went_on = [r[r.index(eos) + 1:] for r in gen.response_ids if eos in r[:-1]]
    assert went_on and all(set(tail) != {pad} for tail in went_on)  # sampled EOS, then sampled on (no padding)
    args = ppo_args(tmp_path, max_steps=1, stop_token=None, response_length=10, num_ppo_epochs=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=model, reward_model=positive_fraction,
                         value_model=tiny(tokenizer, "rm"), train_dataset=[{"prompt": p} for p in PROMPTS])
    exp = trainer.make_experience(trainer._prompt_batch(0))
    assert exp["mask"].sum(-1).tolist() == [10.0] * exp["mask"].shape[0]


@pytest.mark.parametrize("completion_only", [True, False])
def test_sft_loss_is_the_mean_nll_over_the_loss_mask(tokenizer, tmp_path, completion_only):
    from rlhf_fast import ops

    data = [{"prompt": PROMPTS[i], "completion": "the soup was good ."} for i in range(4)]
    model = tiny(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-30, per_device_train_batch_size=4,
                     completion_only_loss=completion_only, **QUIET)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    ids, attention, loss_mask = trainer._collate(trainer.train_examples)
    assert [trainer.loss_token_count(e) for e in trainer.train_examples] == loss_mask.sum(-1).tolist()
    with torch.no_grad():
        logp = ops.selective_log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    expected = float(-(logp * loss_mask).sum() / loss_mask.sum())
    assert trainer.train()[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_sft_drops_examples_without_loss_tokens(tokenizer, tmp_path):
    long_prompt = " ".join(["anna"] * 20)
    data = [{"prompt": long_prompt, "completion": "the soup was good ."},
            {"prompt": PROMPTS[0], "completion": "the soup was good ."}]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, max_length=12, **QUIET)
    with pytest.warns(UserWarning, match="1 of 2 examples have no loss token within max_length=12"):
        trainer = SFTTrainer(model=tiny(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)
    assert len(trainer.train_examples) == 1
    assert trainer.train()[0]["loss"] > 0
    with pytest.raises(ValueError, match="1 of 1 examples have no loss token"):
        SFTTrainer(model=tiny(tokenizer), args=args, train_dataset=data[:1], processing_class=tokenizer)


def test_ppo_max_steps_from_epochs(tokenizer, tmp_path):
    args = ppo_args(tmp_path, max_steps=-1, num_train_epochs=3, per_device_train_batch_size=4,
                    advantage_estimator="grpo", num_generations=2, num_ppo_epochs=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), reward_model=positive_fraction,
                         train_dataset=[{"prompt": p} for p in PROMPTS[:10]])
    assert trainer.num_ppo_steps == 6  # 10 prompts // 4 per step = 2 steps per epoch, 3 epochs
    assert trainer.num_training_steps == 6 * 2  # optimizer steps of the schedule
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6] and trainer.global_step == 6


def test_ppo_refuses_one_model_in_two_roles(tokenizer, tmp_path):
    policy, rm = tiny(tokenizer), tiny(tokenizer, "rm")
    data = [{"prompt": p} for p in PROMPTS]
    with pytest.raises(ValueError, match="ref_model: the same object as model.*ref_model=None"):
        PPOTrainer(args=ppo_args(tmp_path), processing_class=tokenizer, model=policy, ref_model=policy,
                   reward_model=rm, train_dataset=data)
    with pytest.raises(ValueError, match="value_model: the same object as reward_model.*value_model=None"):
        PPOTrainer(args=ppo_args(tmp_path), processing_class=tokenizer, model=policy, reward_model=rm,
                   value_model=rm, train_dataset=data)
    critic = tiny(tokenizer, "rm")
    critic.model = policy.model  # a critic sharing the policy's body
    with pytest.raises(ValueError, match="value_model: shares .* parameter tensors with model"):
        PPOTrainer(args=ppo_args(tmp_path), processing_class=tokenizer, model=policy, reward_model=rm,
                   value_model=critic, train_dataset=data)
    assert all(p.requires_grad for p in policy.parameters()) and all(p.requires_grad for p in rm.parameters())


def test_config_fields_are_type_checked_and_coerced():
    args = PPOConfig(learning_rate="1e-5", vf_coef="1e-1", num_train_epochs=3, max_steps="4", max_grad_norm=None,
                     report_to="jsonl", output_dir=__import__("pathlib").Path("out"))
    assert (args.learning_rate, args.vf_coef, args.num_train_epochs, args.max_steps) == (1e-5, 0.1, 3.0, 4)
    assert isinstance(args.num_train_epochs, float) and args.report_to == ["jsonl"] and args.output_dir == "out"
    with pytest.raises(ValueError, match=r"learning_rate: expected a float, got 'fast' \(str\)"):
        PPOConfig(learning_rate="fast")
    with pytest.raises(ValueError, match=r"max_steps: expected an int, got 1.5 \(float\)"):
        PPOConfig(max_steps=1.5)
    with pytest.raises(ValueError, match=r"bf16: expected a bool, got 'yes' \(str\)"):
        SFTConfig(bf16="yes")
    with pytest.raises(ValueError, match=r"cliprange_value: expected a float or null, got \[1\] \(list\)"):
        PPOConfig(cliprange_value=[1])


def test_ppo_logged_losses_do_not_depend_on_the_micro_batch_budget(tokenizer, tmp_path):
    """pg_loss / vf_loss are the minibatch losses: the same with one micro-batch or many."""
    def run(budget):
        torch.manual_seed(0)
        args = ppo_args(tmp_path / str(budget), max_steps=1, response_length=8, num_ppo_epochs=1, num_mini_batches=1,
                        learning_rate=1e-30, entropy_coef=0.5, max_tokens_per_micro_batch=budget)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer),
                             reward_model=tiny(tokenizer, "rm", seed=1), train_dataset=[{"prompt": p} for p in PROMPTS])
        exp = trainer.make_experience(trainer._prompt_batch(0))
        return trainer.update(exp), len(trainer._plan(exp["lengths"].tolist()))

    (one, count_one), (many, count_many) = run(4096), run(40)
    assert count_one == 1 and count_many >= 4
    for key in ("pg_loss", "vf_loss", "entropy", "clip_frac"):
        assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert abs(one["pg_loss"]) > 1e-3 and one["vf_loss"] > 1e-4


def test_ppo_update_reads_the_device_once(tokenizer, tmp_path, monkeypatch):
    """Statistics stay device tensors through the micro-batches: the trainer's code reads a tensor on the host a
    fixed number of times per update and optimizer step, however many micro-batches there are."""
    reads = []
    trainers_dir = os.path.dirname(__import__("rlhf_fast.trainers.ppo", fromlist=["x"]).__file__)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            if os.path.dirname(sys._getframe(1).f_code.co_filename) == trainers_dir:
                reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def reads_in_update(budget):
        args = ppo_args(tmp_path / str(budget), max_steps=1, response_length=8, num_ppo_epochs=2, num_mini_batches=2,
                        max_tokens_per_micro_batch=budget)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer),
                             reward_model=tiny(tokenizer, "rm", seed=1), train_dataset=[{"prompt": p} for p in PROMPTS])
        exp = trainer.make_experience(trainer._prompt_batch(0))
        reads.clear()
        trainer.update(exp)
        return list(reads)

    few, many = reads_in_update(4096), reads_in_update(24)
    # per epoch the minibatch order, per optimizer step its loss and gradient norm (the finiteness check), and one
    # read of all stats at the end: 2 + 4 + 1, however many micro-batches
    assert few == many and len(many) <= 7, many


def test_metrics_jsonl_restarts_with_each_run_and_resumes_without_duplicates(tokenizer, tmp_path):
    import json

    data = [{"prompt": p, "completion": "the story was good ."} for p in PROMPTS]

    def run(steps, **kw):
        args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, learning_rate=1e-2, per_device_train_batch_size=4,
                         **{**QUIET, **kw})
        trainer = SFTTrainer(model=tiny(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    assert run(4, save_steps=2) == [1, 2, 3, 4]
    assert run(4, resume_from=str(tmp_path / "checkpoint-2")) == [1, 2, 3, 4]  # steps 3, 4 again, once
    assert run(2) == [1, 2]  # a fresh run into the same output_dir


def test_ppo_prompt_truncation_keeps_bos(tokenizer, tmp_path):
    trainer = PPOTrainer(args=ppo_args(tmp_path, max_length=4), processing_class=tokenizer, model=tiny(tokenizer),
                         reward_model=positive_fraction, value_model=tiny(tokenizer, "rm"),
                         train_dataset=[{"prompt": PROMPTS[0]}])
    full = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert trainer.prompt_ids[0] == [tokenizer.bos_token_id] + full[-3:]


def test_reward_pairs_keep_their_responses_when_the_prompt_is_too_long(tokenizer, tmp_path):
    long_prompt = " ".join(["anna"] * 30)
    pairs = [{"prompt": long_prompt, "chosen": "the room was great .", "rejected": "the room was bad and the pool was awful ."},
             {"prompt": long_prompt, "chosen": "the room was good .", "rejected": "the room was good ."}]
    args = RewardConfig(output_dir=str(tmp_path), max_steps=1, max_length=16, **QUIET)
    with pytest.warns(UserWarning, match="1 of 2 pairs have identical chosen and rejected tokens"):
        trainer = RewardTrainer(model=tiny(tokenizer, "rm"), args=args, train_dataset=pairs, processing_class=tokenizer)
    (chosen, rejected, _), = trainer.train_pairs
    rejected_ids = tokenizer("the room was bad and the pool was awful .", add_special_tokens=False)["input_ids"]
    assert len(rejected) == 16 and rejected[0] == tokenizer.bos_token_id
    assert rejected[-len(rejected_ids) - 1:] == rejected_ids + [tokenizer.eos_token_id]
    assert chosen[:len(rejected) - len(rejected_ids) - 1] == rejected[:len(rejected) - len(rejected_ids) - 1]
    assert chosen != rejected


def test_response_mask_with_an_empty_prompt():
    from rlhf_fast.trainers.rollout import response_mask

    mask = response_mask([0, 2], [3, 3], 5)
    # p = 0: the first response token has no predicting position; the other two are labels at positions 0, 1
    assert mask.tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]]


def test_ppo_refuses_empty_prompts_without_bos(tokenizer, tmp_path):
    import copy as copy_module

    no_bos = copy_module.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    with pytest.raises(ValueError, match=r"train_dataset\[1\]: an empty prompt, and the tokenizer has no BOS"):
        PPOTrainer(args=ppo_args(tmp_path), processing_class=no_bos, model=tiny(tokenizer),
                   reward_model=positive_fraction, value_model=tiny(tokenizer, "rm"),
                   train_dataset=[{"prompt": PROMPTS[0]}, {"prompt": ""}])


@pytest.mark.parametrize("eval_steps, expected", [(0, [3]), (2, [2, 3])])
def test_ppo_eval_dataset_is_evaluated_at_the_end(tokenizer, tmp_path, eval_steps, expected):
    args = ppo_args(tmp_path, max_steps=3, eval_steps=eval_steps, num_ppo_epochs=1, num_mini_batches=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), reward_model=positive_fraction,
                         value_model=tiny(tokenizer, "rm"), train_dataset=[{"prompt": p} for p in PROMPTS],
                         eval_dataset=[{"prompt": p} for p in PROMPTS[:3]])
    history = trainer.train()
    assert [r["step"] for r in history if "eval_reward" in r] == expected
    assert len(history) == 3


def test_reward_eval_steps_do_not_wait_for_logging_steps(tokenizer, tmp_path):
    pairs = [{"prompt": p, "chosen": "the room was great .", "rejected": "the room was awful ."} for p in PROMPTS[:8]]
    args = RewardConfig(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, eval_steps=2,
                        logging_steps=3, **QUIET)
    history = RewardTrainer(model=tiny(tokenizer, "rm"), args=args, train_dataset=pairs, eval_dataset=pairs,
                            processing_class=tokenizer).train()
    assert [r["step"] for r in history if "eval_accuracy" in r] == [2, 4, 5]
    assert [r["step"] for r in history if "loss" in r] == [3, 5]
