"""`rlhf-fast demo --quick`: the whole offline pipeline runs and PPO beats SFT on the hidden ground truth."""
import json

import pytest

pytest.importorskip("transformers")

from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402


def test_annotator_labels_pairs_by_the_hidden_rule():
    assert task.ground_truth_score("the room was great and the pool was awful .") == 0.5
    assert task.ground_truth_score("the room was .") == 0.0
    assert task.annotate("p", "the room was bad .", "the room was fine .") == ("the room was fine .", "the room was bad .")
    assert task.annotate("p", "the room was bad .", "the pool was poor .") is None  # ties are skipped


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("metrics.jsonl", "ppo_progress.png", "samples_before.txt", "samples_after.txt",
                 "ppo/final/model/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"sft", "rm", "ppo"}
    ppo_steps = [r["step"] for r in records if r["stage"] == "ppo"]
    assert ppo_steps == sorted(set(ppo_steps))  # one run's records, each step once
    assert summary["rm_accuracy"] >= 0.9
    assert summary["ppo_gt_score"] >= 1.1 * summary["sft_gt_score"]
    assert summary["kl_to_sft"] < 10.0


def test_arithmetic_task_and_tokenizer():
    from rlhf_fast.demo import arithmetic

    tokenizer = arithmetic.build_tokenizer()
    ids = tokenizer("7 + 8 =", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["7", "+", "8", "="]
    assert tokenizer.convert_ids_to_tokens(tokenizer("15", add_special_tokens=False)["input_ids"]) == ["1", "5"]
    assert tokenizer.decode(tokenizer("15")["input_ids"] + [tokenizer.eos_token_id], skip_special_tokens=True) == "15"
    import random

    rng = random.Random(0)
    answers = [int(arithmetic.demonstration(7, 8, rng)) for _ in range(2000)]
    assert abs(answers.count(15) / 2000 - arithmetic.DEMO_ACCURACY) < 0.05  # the demonstrator is right that often
    assert set(answers) == {15 + o for o in [0] + arithmetic.OFFSETS}


@pytest.mark.slow
def test_demo_arithmetic_quick_raises_the_accuracy(tmp_path):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--task", "arithmetic", "--quick", "--out", str(tmp_path), "--seed", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["eval_samples"] == 800
    assert summary["grpo_accuracy"] >= summary["sft_accuracy"] + 0.08, summary


@pytest.mark.parametrize("flags", [["--rollout-engine", "vllm"], ["--advantage-estimator", "rloo"],
                                   ["--method", "dpo"]])
def test_demo_arithmetic_refuses_the_reviews_options(tmp_path, capsys, flags):
    """--task arithmetic runs GRPO with hf generate: the reviews task's options are refused in one line."""
    from rlhf_fast.cli import USER_ERROR

    assert main(["demo", "--task", "arithmetic", "--quick", "--out", str(tmp_path), *flags]) == USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-fast demo: error: --task arithmetic") and "\n" not in err
