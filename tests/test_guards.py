"""Non-finite values stop a run where they enter (rewards, margins) or before the optimizer step (loss, gradient
norm), naming their source; ``on_nonfinite: skip`` skips the step, logged and counted; NaN prints as NaN."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.trainers.errors import NonFiniteError, UserError  # noqa: E402
from rlhf_fast.trainers.guards import check_reward_scores  # noqa: E402
from rlhf_fast.trainers.metrics import format_metric  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)
PROMPTS = [p for p, _ in task.all_prompts()[:8]]


def tiny(tokenizer, kind="lm", seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    return cls(config)


def ppo(tokenizer, tmp_path, reward, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, response_length=4,
                  num_generations=2, advantage_estimator="grpo", num_ppo_epochs=1, num_mini_batches=1,
                  max_tokens_per_micro_batch=64, **QUIET)
    args = PPOConfig(**{**values, **overrides})
    return PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), reward_model=reward,
                      train_dataset=[{"prompt": p} for p in PROMPTS])


def nan_at_three(prompts, completions):
    return [float("nan") if i == 3 else 1.0 for i in range(len(completions))]


def as_strings(prompts, completions):
    return ["1.0"] * len(completions)


def as_none(prompts, completions):
    return None


def one_short(prompts, completions):
    return [0.0] * (len(completions) - 1)


@pytest.mark.parametrize("reward, error, message", [
    # the trainer's reward functions (trainers/rewards.py) name the function and the row
    (nan_at_three, NonFiniteError, r"reward function 'nan_at_three': row 3: expected a finite float or None, got nan"),
    (as_strings, UserError, r"reward function 'as_strings': row 0: expected a float or None, got '1.0' \(str\)"),
    (as_none, UserError, r"reward function 'as_none': expected a list of 8 floats .*got NoneType"),
    (one_short, UserError, r"reward function 'one_short': returned 7 scores for 8 completions"),
])
def test_bad_reward_function_output_is_refused_naming_the_function(tokenizer, tmp_path, reward, error, message):
    trainer = ppo(tokenizer, tmp_path, reward)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    with pytest.raises(error, match=message):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))  # no update happened


def test_reward_scores_accept_numbers_arrays_and_tensors():
    import numpy as np

    for scores in ([1, 2.5], (1.0, 2.5), np.array([1.0, 2.5]), torch.tensor([1.0, 2.5]),
                   [torch.tensor(1.0), np.float32(2.5)]):
        assert check_reward_scores(scores, 2, source="f").tolist() == [1.0, 2.5]
    with pytest.raises(NonFiniteError, match="f: returned inf for completion 1"):
        check_reward_scores([0.0, math.inf], 2, source="f")
    with pytest.raises(UserError, match="f: score 0 is True"):
        check_reward_scores([True, 1.0], 2, source="f")


def test_a_nan_reward_model_is_refused(tokenizer, tmp_path):
    rm = tiny(tokenizer, "rm", seed=1)
    with torch.no_grad():
        rm.score.weight[0, 0] = float("nan")
    trainer = ppo(tokenizer, tmp_path, rm)
    with pytest.raises(NonFiniteError, match=r"reward_model: non-finite scores for 8 of 8 responses"):
        trainer.train()


def test_nan_margins_are_refused_with_the_row(tokenizer, tmp_path):
    from rlhf_fast.trainers.data import load_jsonl

    pairs = [{"prompt": p, "chosen": "the room was great .", "rejected": "the room was awful ."} for p in PROMPTS]
    pairs[5]["margin"] = float("nan")
    args = RewardConfig(output_dir=str(tmp_path), max_steps=1, **QUIET)
    with pytest.raises(ValueError, match=r"train_dataset\[5\]: field 'margin' must be a finite number, got nan"):
        RewardTrainer(model=tiny(tokenizer, "rm"), args=args, train_dataset=pairs, processing_class=tokenizer)
    path = tmp_path / "rm.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))  # Python's json writes (and reads) NaN
    with pytest.raises(ValueError, match=r"rm.jsonl:6: field 'margin' must be a finite number, got nan"):
        load_jsonl(str(path), "rm")


def sft(tokenizer, tmp_path, **overrides):
    data = [{"prompt": p, "completion": "the room was good ."} for p in PROMPTS]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4,
                     **{**QUIET, **overrides})
    return SFTTrainer(model=tiny(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)


def nan_logits_on_call(model, calls):
    """A forward hook: the ``calls``-th training-mode forward passes (1-based) return NaN logits."""
    seen = {"n": 0}

    def hook(module, inputs, output):
        if not module.training:  # generation and scoring
            return output
        seen["n"] += 1
        if seen["n"] in calls:
            output.logits = output.logits + float("nan")  # keeps the graph: NaN gradients too
        return output

    return model.register_forward_hook(hook)


def test_a_nan_loss_stops_the_run_before_the_update(tokenizer, tmp_path):
    trainer = sft(tokenizer, tmp_path)
    nan_logits_on_call(trainer.model, {2})
    with pytest.raises(NonFiniteError, match=r"step 2: grad_norm nan, loss nan; stopped before the update"):
        trainer.train()
    assert trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skip_policy_skips_the_bad_step_logs_it_and_shows_nan(tokenizer, tmp_path, capsys):
    """With the progress bar on: before, the bar's ``:.3f`` of the logged "nan" killed the run."""
    trainer = sft(tokenizer, tmp_path, on_nonfinite="skip", disable_tqdm=False)
    nan_logits_on_call(trainer.model, {2})
    snapshots = []
    original = trainer.optimizer_step

    def spy(parameters, loss=None):
        norm = original(parameters, loss=loss)
        snapshots.append([p.detach().clone() for p in trainer.model.parameters()])
        return norm

    trainer.optimizer_step = spy
    with pytest.warns(UserWarning, match=r"step 2: grad_norm nan, loss nan; the update is skipped"):
        history = trainer.train()
    assert [r["loss"] for r in history][1] == "nan"  # JSON has no NaN: the record holds the string
    assert [r.get("nonfinite_skips", 0) for r in history] == [0, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 3 trained again
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["loss"] == "nan" and json.loads(lines[1])["nonfinite_skips"] == 1


def test_ppo_skip_policy_counts_skipped_optimizer_steps(tokenizer, tmp_path):
    trainer = ppo(tokenizer, tmp_path, lambda p, c: [float(len(x)) for x in c], on_nonfinite="skip",
                  num_mini_batches=2, max_tokens_per_micro_batch=1000)
    nan_logits_on_call(trainer.policy, {1})  # the first minibatch's only micro-batch
    with pytest.warns(UserWarning, match="step 1: grad_norm nan, loss nan; the update is skipped"):
        history = trainer.train()
    assert trainer.nonfinite_skips == 1 and history[-1]["nonfinite_skips"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_format_metric_shows_nan_and_inf():
    assert [format_metric(v) for v in (1.23456, float("nan"), "nan", float("-inf"), torch.tensor(2.0), 3)] == \
        ["1.235", "nan", "nan", "-inf", "2.000", "3.000"]
