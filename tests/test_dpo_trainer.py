"""DPOTrainer on tiny Llama models: the loss is the DPO loss, it learns, log-prob paths and budgets agree, resume is
exact, the reference can be precomputed, errors are clear."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import DPOConfig, DPOTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)
TIMING_KEYS = {"tokens_per_s", "step_time_s", "peak_memory_mb"}
PROMPTS = [p for p, _ in task.all_prompts()[:16]]
PAIRS = [{"prompt": p, "chosen": "the room was great and the pool was fine .", "rejected": "the room was awful ."}
         if i % 2 else {"prompt": p, "chosen": "the food was great .", "rejected": "the food was bad and cold ."}
         for i, p in enumerate(PROMPTS)]


def tiny(tokenizer, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2))


def make(tokenizer, out, model=None, **overrides):
    args = DPOConfig(output_dir=str(out), **{"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
                                             **QUIET, **overrides})
    return DPOTrainer(model if model is not None else tiny(tokenizer), args=args, train_dataset=PAIRS,
                      processing_class=tokenizer)


def strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_first_step_is_log_2_and_training_separates_the_pairs(tokenizer, tmp_path):
    """Policy == reference at the start: every pair's sigmoid loss is log 2 and the implicit rewards are 0."""
    trainer = make(tokenizer, tmp_path, max_steps=30, per_device_train_batch_size=8, beta=0.5)
    history = trainer.train()
    first = history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert first["trainable_params"] == first["total_params"] // 2 > 0  # policy + its frozen copy
    assert history[-1]["loss"] < 0.2 and history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["rewards/margins"] > 1.0


@pytest.mark.parametrize("loss_type,extra", [("robust", {"label_smoothing": 0.1}), ("hinge", {}), ("ipo", {}),
                                             ("simpo", {"simpo_gamma": 0.3}), ("sigmoid", {"reference_free": True})])
def test_every_loss_type_trains(tokenizer, tmp_path, loss_type, extra):
    trainer = make(tokenizer, tmp_path, max_steps=12, per_device_train_batch_size=8, loss_type=loss_type, **extra)
    assert (trainer.ref_runner is None) == (loss_type == "simpo" or bool(extra.get("reference_free")))
    history = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["rewards/margins"] > history[0]["rewards/margins"]


def test_hidden_state_and_logits_paths_agree(tokenizer, tmp_path):
    hidden = make(tokenizer, tmp_path / "h", logprobs_from_hidden=True)
    logits = make(tokenizer, tmp_path / "l", logprobs_from_hidden=False)
    for a, b in zip(strip(hidden.train()), strip(logits.train())):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for a, b in zip(hidden.model.parameters(), logits.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_micro_batch_budget_and_precomputed_reference_do_not_change_the_update(tokenizer, tmp_path):
    base = make(tokenizer, tmp_path / "a", max_tokens_per_micro_batch=4096)
    small = make(tokenizer, tmp_path / "b", max_tokens_per_micro_batch=40, precompute_ref_log_probs=True)
    assert len(small._passes([small.train_pairs[i] for i in small._global_micro_batch(0)])) > 1
    assert small.ref_runner is None  # the frozen copy is dropped once its log-probs are stored
    for a, b in zip(strip(base.train()), strip(small.train())):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(base.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # Adam rescales rounding noise


def test_resume_equals_uninterrupted_run(tokenizer, tmp_path):
    full = make(tokenizer, tmp_path / "full", max_steps=4, gradient_accumulation_steps=2)
    full_history = full.train()
    part = make(tokenizer, tmp_path / "part", max_steps=4, gradient_accumulation_steps=2, save_steps=2)
    part.num_training_steps = 2
    part.train()
    torch.manual_seed(99)
    resumed = make(tokenizer, tmp_path / "resumed", max_steps=4, gradient_accumulation_steps=2,
                   resume_from=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.global_step == 2
    resumed_history = resumed.train()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert strip(resumed_history) == strip(full_history)


def test_eval_dataset_is_evaluated(tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, **QUIET)
    trainer = DPOTrainer(tiny(tokenizer), args=args, train_dataset=PAIRS, eval_dataset=PAIRS[:5],
                         processing_class=tokenizer)
    history = trainer.train()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(history[-1])


def test_errors_name_the_field(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing: loss_type='ipo' takes no label smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="precompute_ref_log_probs: there is no reference"):
        DPOConfig(reference_free=True, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match=r"beta: expected a value in \(0, inf\)"):
        DPOConfig(beta=0)
    model = tiny(tokenizer)
    with pytest.raises(ValueError, match="ref_model: the policy itself"):
        DPOTrainer(model, model, args=DPOConfig(output_dir=str(tmp_path), **QUIET), train_dataset=PAIRS,
                   processing_class=tokenizer)
    with pytest.raises(ValueError, match="data_collator: not supported"):
        DPOTrainer(model, None, DPOConfig(output_dir=str(tmp_path), **QUIET), object(), PAIRS,
                   processing_class=tokenizer)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch: a pair has"):
        make(tokenizer, tmp_path, max_tokens_per_micro_batch=8).train()
    with pytest.raises(ValueError, match="train_dataset\\[0\\]: missing field 'rejected'"):
        DPOTrainer(model, args=DPOConfig(output_dir=str(tmp_path), **QUIET), train_dataset=[{"prompt": "a", "chosen": "b"}],
                   processing_class=tokenizer)


def test_an_explicit_reference_model_is_used(tokenizer, tmp_path):
    """A reference other than the policy's initial weights: the first loss is no longer log 2."""
    reference = tiny(tokenizer, seed=5)
    trainer = DPOTrainer(tiny(tokenizer), copy.deepcopy(reference), DPOConfig(output_dir=str(tmp_path), max_steps=1,
                                                                             **QUIET),
                         train_dataset=PAIRS, processing_class=tokenizer)
    assert trainer.train()[0]["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_dpo_command_trains_and_checks_its_config(tokenizer, tmp_path, capsys):
    import json

    from rlhf_fast.cli import main

    tiny(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    fast = "disable_tqdm: true\nplot: false\nreport_to: [jsonl]\n"
    config = tmp_path / "dpo.yaml"
    config.write_text("model: policy\ntrain_file: pairs.jsonl\neval_file: pairs.jsonl\noutput_dir: out\nmax_steps: 2\n"
                      "per_device_train_batch_size: 4\nloss_type: ipo\nbeta: 0.5\n" + fast)
    assert main(["dpo", "--config", str(config)]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "final" / "model" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/accuracies"} <= set(records[0]) and "eval_loss" in records[-1]
    capsys.readouterr()
    for text, message in [("loss_type: ipo\nlabel_smoothing: 0.2\n", "label_smoothing: loss_type='ipo' takes no"),
                          ("los_type: ipo\n", "unknown key 'los_type'.*did you mean 'loss_type'"),
                          ("reward_model: policy\n", "unknown key 'reward_model'"),
                          ("beta: -1\n", r"beta: expected a value in \(0, inf\)")]:
        config.write_text("model: policy\ntrain_file: pairs.jsonl\n" + text)
        assert main(["dpo", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rlhf-fast dpo: error:") and len(err.strip().splitlines()) == 1
        import re

        assert re.search(message, err), err


def test_demo_method_is_checked(tmp_path):
    from rlhf_fast.cli import build_parser
    from rlhf_fast.demo.pipeline import run_demo

    assert build_parser().parse_args(["demo", "--method", "both"]).method == "both"
    with pytest.raises(ValueError, match=r"method: expected one of \['ppo', 'dpo', 'both'\], got 'kto'"):
        run_demo(str(tmp_path), method="kto")
