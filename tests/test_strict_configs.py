"""Every config field is checked when the config is built (Python and YAML), naming the field, the value, the
expected range and the file; the CLI turns a user error into one line and its own exit status."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import PPOConfig, PPOTrainer, RewardConfig, SFTConfig, SFTTrainer  # noqa: E402
from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.trainers.config import SCHEDULERS  # noqa: E402
from rlhf_fast.trainers.from_config import read_config  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)


@pytest.mark.parametrize("config, field, value, message", [
    (SFTConfig, "max_grad_norm", -1, r"max_grad_norm: expected a value in \(0, inf\), got -1.0 \(null turns"),
    (SFTConfig, "max_grad_norm", 0, r"max_grad_norm: expected a value in \(0, inf\), got 0.0"),
    (SFTConfig, "learning_rate", float("inf"), r"learning_rate: expected a value in \(0, inf\), got inf"),
    (SFTConfig, "learning_rate", float("nan"), r"learning_rate: expected a value in \(0, inf\), got nan"),
    (SFTConfig, "save_steps", -1, r"save_steps: expected a value in \[0, inf\), got -1"),
    (SFTConfig, "weight_decay", -1, r"weight_decay: expected a value in \[0, inf\), got -1.0"),
    (SFTConfig, "adam_beta1", 1.5, r"adam_beta1: expected a value in \[0, 1\), got 1.5"),
    (SFTConfig, "adam_beta2", 1.0, r"adam_beta2: expected a value in \[0, 1\), got 1.0"),
    (SFTConfig, "adam_epsilon", -1, r"adam_epsilon: expected a value in \(0, inf\), got -1.0"),
    (SFTConfig, "warmup_steps", -3, r"warmup_steps: expected a value in \[0, inf\)"),
    (SFTConfig, "seed", -1, r"seed: expected a value in \[0, "),
    (SFTConfig, "lr_scheduler_type", "cosin", r"lr_scheduler_type: expected one of .* got 'cosin' \(did you mean 'cosine'\?\)"),
    (SFTConfig, "lr_scheduler_type", "reduce_lr_on_plateau", r"lr_scheduler_type: expected one of"),
    (SFTConfig, "device", "gpu", r"device: expected 'cpu', 'cuda'.* got 'gpu'"),
    (SFTConfig, "device", "meta", r"device: expected 'cpu', 'cuda'.* got 'meta'"),
    (SFTConfig, "report_to", ["wandb"], r"report_to: 'wandb' is not supported"),
    (SFTConfig, "report_to", ["jsonl", "mlflow"], r"report_to: 'mlflow' is not supported"),
    (SFTConfig, "on_nonfinite", "ignore", r"on_nonfinite: expected one of \['error', 'skip'\], got 'ignore'"),
    (RewardConfig, "center_rewards_coefficient", -0.1, r"center_rewards_coefficient: expected a value in \[0, inf\)"),
    (RewardConfig, "eval_steps", -1, r"eval_steps: expected a value in \[0, inf\)"),
    (PPOConfig, "gamma", 1.5, r"gamma: expected a value in \[0, 1\], got 1.5"),
    (PPOConfig, "lam", -0.1, r"lam: expected a value in \[0, 1\]"),
    (PPOConfig, "temperature", float("inf"), r"temperature: expected a value in \(0, inf\), got inf"),
    (PPOConfig, "top_k", -1, r"top_k: expected a value in \[0, inf\)"),
    (PPOConfig, "kl_coef", float("nan"), r"kl_coef: expected a value in \[0, inf\), got nan"),
    (PPOConfig, "target_kl", 0, r"target_kl: expected a value in \(0, inf\)"),
    (PPOConfig, "cliprange", 2.0, r"cliprange: expected a value in \[0, 1\]"),
    (PPOConfig, "dual_clip", 1.0, r"dual_clip: expected a value in \(1, inf\)"),
    (PPOConfig, "vf_coef", -1, r"vf_coef: expected a value in \[0, inf\)"),
    (PPOConfig, "missing_eos_penalty", float("inf"), r"missing_eos_penalty: expected a value in \(-inf, inf\)"),
    (PPOConfig, "stop_token", "</s>", r"stop_token: expected one of \['eos', None\], got '</s>'"),
    (PPOConfig, "loss_agg", "token_mean", r"loss_agg: expected one of .*did you mean 'token-mean'"),
])
def test_bad_field_values_are_refused_naming_field_value_and_range(config, field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(output_dir=str(tmp_path), **{field: value})


def test_cuda_is_refused_where_there_is_none(tmp_path):
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda:99', but this machine has"):
            SFTConfig(output_dir=str(tmp_path), device="cuda:99")
    else:
        with pytest.raises(ValueError, match="device: 'cuda', but CUDA is not available"):
            SFTConfig(output_dir=str(tmp_path), device="cuda")


def test_output_dir_must_be_creatable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="output_dir: cannot create .*file.* is a file"):
        SFTConfig(output_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ValueError, match="output_dir: .* exists and is not a directory"):
        SFTConfig(output_dir=str(tmp_path / "file"))
    SFTConfig(output_dir=str(tmp_path / "new" / "deeper"))  # creatable: accepted, and nothing is created yet
    assert not (tmp_path / "new").exists()


def test_report_to_none_and_resume_from_must_exist(tmp_path):
    assert SFTConfig(output_dir=str(tmp_path), report_to="none").report_to == []
    assert SFTConfig(output_dir=str(tmp_path), report_to=[]).report_to == []
    with pytest.raises(ValueError, match="resume_from: no checkpoint directory at"):
        SFTConfig(output_dir=str(tmp_path), resume_from=str(tmp_path / "checkpoint-9"))
    assert SFTConfig(output_dir=str(tmp_path), resume_from="latest").resume_from == "latest"


def test_every_allowed_scheduler_runs_in_transformers():
    """The allowed names are the transformers schedulers that need no extra arguments; each builds and steps."""
    from transformers import get_scheduler

    for name in SCHEDULERS:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4)
        for _ in range(4):
            optimizer.step()
            scheduler.step()


def write(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_errors_name_the_file_and_duplicate_keys_are_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    head = "model: m\ntrain_file: d.jsonl\n"
    path = write(tmp_path / "bad.yaml", head + "max_grad_norm: -1\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: max_grad_norm: expected a value in (0, inf), got -1.0")):
        read_config("sft", path)
    path = write(tmp_path / "dup.yaml", head + "learning_rate: 1.0e-5\nseed: 1\nlearning_rate: 2.0e-5\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:5: duplicate key 'learning_rate' (first given on line 3)")):
        read_config("sft", path)
    path = write(tmp_path / "nested.yaml", head + "report_to: {a: 1, a: 2}\n")
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        read_config("sft", path)
    path = write(tmp_path / "latin1.yaml", "")
    (tmp_path / "latin1.yaml").write_bytes(b"model: m\xe9\n")
    with pytest.raises(ValueError, match="latin1.yaml: not UTF-8"):
        read_config("sft", path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("strict")
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    torch.manual_seed(0)
    for name, cls in (("policy", transformers.LlamaForCausalLM), ("rm", transformers.LlamaForSequenceClassification)):
        cls(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "sft.jsonl").write_text(json.dumps({"prompt": "anna asks : describe the hotel",
                                                "completion": "the room was good ."}) + "\n")
    (root / "long.jsonl").write_text(json.dumps({"prompt": "anna asks : describe the hotel",
                                                 "completion": " ".join(["the room was good and"] * 20)}) + "\n")
    (root / "ppo.jsonl").write_text(json.dumps({"prompt": "anna asks : describe the hotel"}) + "\n")
    return root


FAST = "disable_tqdm: true\nplot: false\nreport_to: [jsonl]\n"


@pytest.mark.parametrize("stage, text, message", [
    ("sft", "model: policy\ntrain_file: sft.jsonl\nmax_grad_norm: -1\n", r"sft.yaml: max_grad_norm: expected a value in \(0, inf\), got -1.0"),
    ("sft", "model: policy\ntrain_file: sft.jsonl\nlr_scheduler_type: cosin\n", r"sft.yaml: lr_scheduler_type: .*did you mean 'cosine'"),
    ("sft", "model: policy\ntrain_file: sft.jsonl\ndevice: gpu\n", r"sft.yaml: device: .*got 'gpu'"),
    ("sft", "model: policy\ntrain_file: sft.jsonl\nseed: 1\nseed: 2\n", r"sft.yaml:7: duplicate key 'seed' \(first given on line 6\)"),
    ("sft", "model: policy\ntrain_file: sft.jsonl\noutput_dir: sft.jsonl/out\n", r"output_dir: cannot create"),
    ("sft", "model: policy\ntrain_file: long.jsonl\nmax_length: 100\n", r"max_length: the longest example .* is \d+ tokens, more than model's max_position_embeddings=64"),
    ("ppo", "model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\nresponse_length: 60\n",
     r"max_length \+ response_length: .* more than model's max_position_embeddings=64"),
    ("ppo", "model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\nresponse_length: 30\nmax_tokens_per_micro_batch: 32\n",
     r"max_length \+ response_length: .*response_length=30 is \d+ tokens, more than max_tokens_per_micro_batch=32"),
])
def test_cli_user_errors_are_one_line_with_exit_status_2(workspace, capsys, stage, text, message):
    path = workspace / f"{stage}.yaml"
    path.write_text(FAST + text)
    assert main([stage, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    # the last line (transformers may print its weight-loading progress before), and no traceback
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rlhf-fast {stage}: error:") and "Traceback" not in err, err
    assert re.search(message, last), err


def test_cli_bugs_keep_their_traceback(workspace, monkeypatch):
    """Our own bugs are not dressed up as user errors: the exception propagates (status 1 from Python)."""
    from rlhf_fast.trainers import sft

    def broken(self):
        raise KeyError("a bug")

    monkeypatch.setattr(sft.SFTTrainer, "train", broken)
    path = workspace / "bug.yaml"
    path.write_text(FAST + f"model: policy\ntrain_file: sft.jsonl\noutput_dir: {workspace / 'bug'}\nmax_steps: 1\n")
    with pytest.raises(KeyError, match="a bug"):
        main(["sft", "--config", str(path)])


def test_ppo_refuses_too_long_sequences_at_construction(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    policy, rm = transformers.LlamaForCausalLM(config), transformers.LlamaForSequenceClassification(config)
    data = [{"prompt": "anna asks : describe the hotel"}]
    args = PPOConfig(output_dir=str(tmp_path), response_length=20, max_tokens_per_micro_batch=16, num_mini_batches=1,
                     per_device_train_batch_size=1, **QUIET)
    with pytest.raises(ValueError, match="max_length \\+ response_length: .*max_tokens_per_micro_batch=16"):
        PPOTrainer(args=args, processing_class=tokenizer, model=policy, reward_model=rm, train_dataset=data)
    args = PPOConfig(output_dir=str(tmp_path), response_length=60, num_mini_batches=1, per_device_train_batch_size=1,
                     **QUIET)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        PPOTrainer(args=args, processing_class=tokenizer, model=policy, reward_model=rm, train_dataset=data)


def test_sft_refuses_examples_longer_than_the_model_positions(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2))
    data = [{"prompt": "anna asks : describe the hotel", "completion": " ".join(["the room was good and"] * 20)}]
    with pytest.raises(ValueError, match="max_length: the longest example .*max_position_embeddings=64"):
        SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), **QUIET), train_dataset=data,
                   processing_class=tokenizer)
    SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), max_length=64, **QUIET), train_dataset=data,
               processing_class=tokenizer)  # cut to the model's limit: accepted
