"""Trainers on tiny Llama models with the demo tokenizer: losses fall, PPO learns, resume is exact, errors are clear."""
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf_fast import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import load_tokenizer, tiny_llama_config  # noqa: E402
from rlhf_fast.trainers.data import load_jsonl  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)
TIMING_KEYS = {"tokens_per_s", "time_generate_s", "time_score_s", "time_train_s", "step_time_s"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and CI machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


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
    assert ("eval_reward" in metrics) == ("eval_steps" in overrides)
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
    text = ("model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\ncritic: value_head\nmax_steps: 1\n"
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
