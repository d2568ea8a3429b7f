"""`rlhf-fast sft | rm | ppo --config FILE.yaml` on local model directories and JSONL, and their error messages."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import load_tokenizer, tiny_llama_config  # noqa: E402

FAST = "disable_tqdm: true\nplot: false\nreport_to: [jsonl]\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny policy, a tiny reward model (with the tokenizer saved beside them) and JSONL files."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = load_tokenizer()
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    torch.manual_seed(0)
    for name, cls in (("policy", transformers.LlamaForCausalLM), ("rm", transformers.LlamaForSequenceClassification)):
        cls(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    prompts = [p for p, _ in task.all_prompts()[:8]]
    write_jsonl(root / "sft.jsonl", [{"prompt": p, "completion": "the room was good ."} for p in prompts])
    write_jsonl(root / "rm.jsonl", [{"prompt": p, "chosen": "the room was good .", "rejected": "the room was bad ."}
                                    for p in prompts])
    write_jsonl(root / "ppo.jsonl", [{"prompt": p} for p in prompts])
    return root


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def run(workspace, stage, text, capsys):
    path = workspace / f"{stage}.yaml"
    path.write_text(text + FAST)
    code = main([stage, "--config", str(path)])
    return code, capsys.readouterr().err


def test_sft_rm_ppo_commands_train_and_save(workspace, capsys):
    code, err = run(workspace, "sft", "model: policy\ntrain_file: sft.jsonl\noutput_dir: out_sft\nmax_steps: 2\n", capsys)
    assert code == 0, err
    assert (workspace / "out_sft" / "final" / "model" / "model.safetensors").is_file()
    assert (workspace / "out_sft" / "metrics.jsonl").read_text().count("\n") == 2
    code, err = run(workspace, "rm", "model: rm\ntrain_file: rm.jsonl\neval_file: rm.jsonl\noutput_dir: out_rm\n"
                    "max_steps: 2\n", capsys)
    assert code == 0, err
    code, err = run(workspace, "ppo", "model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\noutput_dir: out_ppo\n"
                    "max_steps: 1\nper_device_train_batch_size: 4\nresponse_length: 4\n", capsys)
    assert code == 0, err
    record = json.loads((workspace / "out_ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward", "kl", "vf_loss", "time_generate_s"} <= set(record)


@pytest.mark.parametrize("stage, text, message", [
    ("sft", "model: policy\ntrain_file: sft.jsonl\nlearning_rat: 0.1\n", "unknown key 'learning_rat'.*did you mean 'learning_rate'"),
    ("sft", "model: policy\n", "missing required key 'train_file'"),
    ("ppo", "model: policy\ntrain_file: ppo.jsonl\n", "missing required key 'reward_model'"),
    ("rm", "model: nowhere\ntrain_file: rm.jsonl\n", "model not found: .*nowhere"),
    ("sft", "model: policy\ntrain_file: missing.jsonl\n", "train_file not found"),
    ("sft", "model: policy\ntrain_file: bad.jsonl\n", r"bad.jsonl:2: invalid JSON"),
    ("rm", "model: rm\ntrain_file: sft.jsonl\n", r"sft.jsonl:1: missing field 'chosen'"),
    ("ppo", "model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\nadvantage_estimator: grpo\n", "num_generations >= 2"),
    ("sft", "- just\n- a list\n", "expected a mapping"),
])
def test_bad_configs_and_data_give_one_clear_line(workspace, capsys, stage, text, message):
    (workspace / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    path = workspace / "bad.yaml"
    path.write_text(text)
    assert main([stage, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlhf-fast {stage}: error:")
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err


def test_yaml_numbers_are_coerced_and_bad_values_named(workspace, capsys):
    """PyYAML reads 1e-5 (no dot) as a string: float fields take numeric strings; other values are refused with
    the field, the expected type and the value."""
    from rlhf_fast.trainers.from_config import read_config

    path = workspace / "types.yaml"
    path.write_text("model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\nlearning_rate: 1e-5\nvf_coef: 1e-1\n"
                    "num_train_epochs: 2\nmax_steps: 3\n" + FAST)
    _, config = read_config("ppo", str(path))
    assert (config.learning_rate, config.vf_coef, config.num_train_epochs) == (1e-5, 0.1, 2.0)
    code, err = run(workspace, "ppo", "model: policy\nreward_model: rm\ntrain_file: ppo.jsonl\nvf_coef: 1e-1x\n",
                    capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ppo.yaml: vf_coef: expected a float, got '1e-1x' (str)" in err
    code, err = run(workspace, "sft", "model: policy\ntrain_file: sft.jsonl\nmax_steps: ten\n", capsys)
    assert code == 2 and "max_steps: expected an int, got 'ten' (str)" in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["ppo", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
