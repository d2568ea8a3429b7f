"""Reward functions: TRL's calling convention, dataset columns, weights, None, every bad return, YAML, built-ins."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import PPOConfig, PPOTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.rewards import answer_match, regex_format  # noqa: E402
from rlhf_fast.trainers.rewards import RewardFunctionError, RewardFunctions, load_reward_function  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)
PROMPTS = [p for p, _ in task.all_prompts()[:8]]


def tiny(tokenizer, kind="lm", seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    return cls(config)


def grpo_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-3, per_device_train_batch_size=4,
                  response_length=5, temperature=1.0, num_ppo_epochs=1, num_mini_batches=1, seed=1,
                  advantage_estimator="grpo", num_generations=2, max_tokens_per_micro_batch=48, **QUIET)
    values.update(overrides)
    return PPOConfig(**values)


def dataset():
    """Prompts with two extra columns: the reward functions must see them row by row."""
    return [{"prompt": p, "answer": i, "tag": f"t{i}"} for i, p in enumerate(PROMPTS)]


def score(functions, prompts, completions, **columns):
    """What the trainer does with the functions' scores: the table, then the weighted sum."""
    rows = list(range(len(completions)))
    out = torch.zeros((len(rows), len(functions)))
    functions.score_functions(out, rows, prompts, completions, [[0]] * len(rows), columns)
    return out, functions.combine(out)


# ---- the trainer: columns and completions reach the functions ------------------------------------------------
def test_dataset_columns_and_texts_reach_the_functions(tokenizer, tmp_path):
    calls = []

    def recorder(prompts, completions, completion_ids, answer, tag, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                          tag=tag, extra=kwargs))
        return [float(a) for a in answer]

    def only_named(completions, answer):  # no **kwargs: gets only what it names
        return [0.5] * len(completions)

    trainer = PPOTrainer(args=grpo_args(tmp_path), processing_class=tokenizer, model=tiny(tokenizer),
                         reward_model=[recorder, only_named], train_dataset=dataset())
    metrics = trainer.train()[-1]
    exp = trainer.last_experience
    (call,) = calls  # one batched call per step in one process
    index = {p: i for i, p in enumerate(PROMPTS)}
    assert len(call["prompts"]) == 8 and call["extra"] == {}
    for prompt, answer, tag in zip(call["prompts"], call["answer"], call["tag"]):
        assert answer == index[prompt] and tag == f"t{index[prompt]}"  # each row's own column values
    assert call["completions"] == exp["completions"]
    assert call["completions"] == tokenizer.batch_decode(call["completion_ids"], skip_special_tokens=True)
    # the score is the weighted (1, 1) sum, computed directly here
    expected = torch.tensor(call["answer"], dtype=torch.float32) + 0.5
    torch.testing.assert_close(exp["scores"].cpu(), expected)
    assert metrics["rewards/recorder/mean"] == pytest.approx(sum(call["answer"]) / 8)
    assert metrics["rewards/only_named/mean"] == 0.5 and metrics["rewards/only_named/std"] == 0.0


def test_a_model_and_functions_mixed_with_weights(tokenizer, tmp_path):
    rm = tiny(tokenizer, "rm", seed=5)

    def length(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    args = grpo_args(tmp_path, reward_weights=[2.0, -0.5])
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer), reward_model=[rm, length],
                         train_dataset=dataset())
    trainer.train()
    exp = trainer.last_experience
    parts = exp["reward_parts"].cpu()
    # the model's column is its last-token score of each sequence, computed directly
    sequences = exp["ids"].cpu()
    attention = exp["attention"].cpu()
    with torch.no_grad():
        body = rm.model(input_ids=sequences, attention_mask=attention).last_hidden_state
        direct = rm.score(body).squeeze(-1)[torch.arange(len(sequences)), attention.sum(-1) - 1]
    torch.testing.assert_close(parts[:, 0], direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[:, 1], torch.tensor([float(len(c.split())) for c in exp["completions"]]))
    torch.testing.assert_close(exp["scores"].cpu(), 2.0 * parts[:, 0] - 0.5 * parts[:, 1])


# ---- the table, the weighted sum and None, against a direct computation ------------------------------------------
def test_weights_and_none_against_a_direct_sum():
    def a(completions, **kwargs):
        return [1.0, None, 3.0, None]

    def b(completions, **kwargs):
        return [10.0, 20.0, None, 40.0]

    functions = RewardFunctions([a, b], [0.5, 2.0])
    table, combined = score(functions, ["p"] * 4, ["c"] * 4)
    nan = float("nan")
    torch.testing.assert_close(table, torch.tensor([[1.0, 10.0], [nan, 20.0], [3.0, nan], [nan, 40.0]]),
                               equal_nan=True)
    torch.testing.assert_close(combined, torch.tensor([0.5 + 20.0, 40.0, 1.5, 80.0]))
    metrics = functions.metrics(table)
    assert metrics["rewards/a/mean"] == 2.0 and metrics["rewards/b/mean"] == pytest.approx(70 / 3)


def test_a_row_no_function_scores_is_an_error():
    functions = RewardFunctions([lambda completions, **k: [1.0, None], lambda completions, **k: [None, None]])
    with pytest.raises(RewardFunctionError, match="all returned None for row 1"):
        score(functions, ["p"] * 2, ["c"] * 2)


@pytest.mark.parametrize("returned, message", [
    ([1.0], r"'bad': returned 1 scores for 2 completions"),
    ([1.0, float("nan")], r"'bad': row 1: expected a finite float or None, got nan"),
    ([float("inf"), 1.0], r"'bad': row 0: expected a finite float or None, got inf"),
    ([1.0, "1.0"], r"'bad': row 1: expected a float or None, got '1.0' \(str\)"),
    ([True, 1.0], r"'bad': row 0: expected a float or None, got True \(bool\)"),
    ([[1.0], 1.0], r"'bad': row 0: expected a float or None, got \[1.0\] \(list\)"),
    ("10", r"'bad': expected a list of 2 floats .*got str"),
    (None, r"'bad': expected a list of 2 floats .*got NoneType"),
    (3.0, r"'bad': expected a list of 2 floats .*got float"),
], ids=["count", "nan", "inf", "string", "bool", "nested", "str", "none", "scalar"])
def test_bad_returns_name_the_function_and_the_row(returned, message):
    def bad(completions, **kwargs):
        return returned

    with pytest.raises(RewardFunctionError, match=message):
        score(RewardFunctions(bad), ["p"] * 2, ["c"] * 2)


def test_numpy_and_tensor_returns_are_accepted():
    np = pytest.importorskip("numpy")
    functions = RewardFunctions([lambda completions, **k: np.array([1.0, 2.0]),
                                 lambda completions, **k: torch.tensor([3.0, 4.0])])
    _, combined = score(functions, ["p"] * 2, ["c"] * 2)
    torch.testing.assert_close(combined, torch.tensor([4.0, 6.0]))


def test_a_raising_function_is_named_with_its_rows():
    def checker(completions, **kwargs):
        raise KeyError("solution")

    with pytest.raises(RewardFunctionError, match=r"'checker' raised KeyError: 'solution' \(on rows 0..2, first "
                                                  r"prompt 'p0'\)") as info:
        score(RewardFunctions(checker), ["p0", "p1", "p2"], ["c"] * 3)
    assert isinstance(info.value.__cause__, KeyError)  # the original traceback stays attached


def test_the_older_positional_convention_still_works():
    _, combined = score(RewardFunctions(lambda p, c: [float(len(x)) for x in c]), ["p", "q"], ["ab", "abc"])
    torch.testing.assert_close(combined, torch.tensor([2.0, 3.0]))


def test_a_missing_argument_names_the_columns():
    def needs(completions, solution):
        return [1.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"'needs' needs the argument 'solution'.*columns: \['answer'\]"):
        score(RewardFunctions(needs), ["p"], ["c"], answer=[1])


def test_bad_reward_model_and_weights_are_refused():
    with pytest.raises(TypeError, match=r"reward_model\[1\]: expected a model or a callable, got int"):
        RewardFunctions([answer_match, 3])
    with pytest.raises(ValueError, match=r"reward_weights: expected one weight per reward \(2: answer_match, f"):
        RewardFunctions([answer_match, regex_format("x", name="f")], [1.0])
    with pytest.raises(ValueError, match=r"reward_weights\[0\]: expected a finite number, got nan"):
        PPOConfig(reward_weights=[float("nan")])
    with pytest.raises(ValueError, match=r"reward_weights\[1\]: expected a float, got 'x'"):
        PPOConfig(reward_weights=[1, "x"])
    assert PPOConfig(reward_weights=[1, "0.5"]).reward_weights == [1.0, 0.5]  # YAML strings coerced


def test_dataset_columns_must_be_in_every_record(tokenizer, tmp_path):
    data = dataset()
    del data[3]["answer"]
    with pytest.raises(ValueError, match=r"train_dataset\[3\]: missing field 'answer'"):
        PPOTrainer(args=grpo_args(tmp_path), processing_class=tokenizer, model=tiny(tokenizer),
                   reward_model=answer_match, train_dataset=data)
    with pytest.raises(ValueError, match=r"train_dataset: field 'completions' clashes"):
        PPOTrainer(args=grpo_args(tmp_path), processing_class=tokenizer, model=tiny(tokenizer),
                   reward_model=answer_match, train_dataset=[{"prompt": "a", "completions": 1}])


# ---- built-ins ---------------------------------------------------------------------------------------------------
def test_answer_match():
    completions = ["3 + 4 = 7", "it is 12 or 13", "no number", "7.0", "Paris.", "paris", "-5", "1,234"]
    answers = [7, "13", 1, 7, "paris", "Lyon", -5, 1234]
    assert answer_match(completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert answer_match(["7"], [None]) == [None]


def test_regex_format():
    fmt = regex_format(r"<answer>\d+</answer>", name="answer_tag")
    assert fmt(["<answer>12</answer>", " <answer>3</answer>\n", "<answer>x</answer>", "a <answer>1</answer>"]) == \
        [1.0, 1.0, 0.0, 0.0]
    assert RewardFunctions(fmt).names == ["answer_tag"]


# ---- loading from YAML -------------------------------------------------------------------------------------------
def test_load_reward_function_from_a_module_and_a_file(tmp_path):
    assert load_reward_function("rlhf_fast.rewards:answer_match") is answer_match
    (tmp_path / "mine.py").write_text("def ok(completions, **kw):\n    return [1.0] * len(completions)\n")
    assert load_reward_function("mine.py:ok", str(tmp_path))(["a", "b"]) == [1.0, 1.0]
    for spec, message in (("rlhf_fast.rewards", "expected 'module:function'"),
                          ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                          ("rlhf_fast.rewards:nope", "has no function 'nope'"),
                          ("missing.py:f", "file not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_reward_function(spec, str(tmp_path))


def test_yaml_reward_funcs_with_a_model_and_weights(tokenizer, tmp_path):
    from rlhf_fast.trainers.from_config import build_trainer

    for name, model in (("policy", tiny(tokenizer)), ("rm", tiny(tokenizer, "rm"))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dataset()))
    (tmp_path / "mine.py").write_text("def half(completions, **kw):\n    return [0.5] * len(completions)\n")
    base = ("model: policy\ntrain_file: data.jsonl\nmax_steps: 1\noutput_dir: out\nadvantage_estimator: grpo\n"
            "num_generations: 2\nper_device_train_batch_size: 2\nresponse_length: 4\ndisable_tqdm: true\n"
            "plot: false\nreport_to: [jsonl]\n")
    (tmp_path / "ok.yaml").write_text(base + "reward_model: rm\nreward_funcs: [rlhf_fast.rewards:answer_match, "
                                             "mine.py:half]\nreward_weights: [0.0, 1, '2']\n")
    trainer = build_trainer("ppo", str(tmp_path / "ok.yaml"))
    assert trainer.rewards.names[1:] == ["answer_match", "half"]
    metrics = trainer.train()[-1]
    assert metrics["reward"] == pytest.approx(1.0 * metrics["rewards/answer_match/mean"] + 2 * 0.5)
    for extra, message in (("reward_funcs: [mine.py:nope]\n", "ok2.yaml: reward_funcs: 'mine.py:nope'"),
                           ("reward_funcs: [rlhf_fast.rewards:answer_match]\nreward_weights: [1, 2]\n",
                            "reward_weights: expected 1 weights .*got 2"),
                           ("reward_funcs: 3\n", "reward_funcs: expected a list"),
                           ("reward_funcs: [rlhf_fast.rewards:answer_match]\nreward_funcs_x: 1\n", "unknown key")):
        (tmp_path / "ok2.yaml").write_text(base + extra)
        with pytest.raises(ValueError, match=message):
            build_trainer("ppo", str(tmp_path / "ok2.yaml"))
    (tmp_path / "none.yaml").write_text(base)
    with pytest.raises(ValueError, match="missing required key 'reward_model' or 'reward_funcs'"):
        build_trainer("ppo", str(tmp_path / "none.yaml"))


def test_cli_reports_a_failing_reward_function_in_one_line(tokenizer, tmp_path, capsys):
    from rlhf_fast.cli import main

    tiny(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dataset()))
    (tmp_path / "bad.py").write_text("def nan(completions, **kw):\n    return [float('nan')] * len(completions)\n")
    (tmp_path / "ppo.yaml").write_text(
        "model: policy\ntrain_file: data.jsonl\nreward_funcs: [bad.py:nan]\nmax_steps: 1\noutput_dir: out\n"
        "advantage_estimator: rloo\nnum_generations: 2\nper_device_train_batch_size: 2\nresponse_length: 3\n"
        "disable_tqdm: true\nplot: false\nreport_to: [jsonl]\n")
    assert main(["ppo", "--config", str(tmp_path / "ppo.yaml")]) == 3  # the non-finite exit status
    err = capsys.readouterr().err  # (transformers' loading bars come before)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("rlhf-fast ppo: error: reward function 'nan': row 0: expected a finite "
                                            "float or None, got nan")
