"""Fault injection: kill -9 during checkpoint writes, damaged checkpoint files, two runs on one directory.

Checkpoints carry a manifest (size and SHA-256 of every file, written last); ``resume_from`` verifies it and
refuses a damaged checkpoint naming the file and offering the newest verified one; ``resume_from: latest`` falls
back to it. One run holds an output directory at a time (``rlhf_fast.lock``).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.trainers import manifest  # noqa: E402
from rlhf_fast.trainers.errors import CheckpointError, OutputDirBusy  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False)
PROMPTS = [p for p, _ in task.all_prompts()[:8]]
SFT_DATA = [{"prompt": p, "completion": "the room was good ."} for p in PROMPTS]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(tokenizer, kind="lm", seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    return cls(config)


def sft(tokenizer, out, **overrides):
    args = SFTConfig(output_dir=str(out), max_steps=4, learning_rate=1e-2, per_device_train_batch_size=4,
                     **{**QUIET, **overrides})
    return SFTTrainer(model=tiny(tokenizer), args=args, train_dataset=SFT_DATA, processing_class=tokenizer)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    """An SFT run of 4 steps with checkpoint-2, checkpoint-4 and final."""
    out = tmp_path_factory.mktemp("faults") / "run"
    sft(tokenizer, out, save_steps=2).train()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped byte in a tensor file": ("model/model.safetensors", flip_byte, "content differs from the manifest"),
    "flipped byte in a DCP shard": ("distcp/__0_0.distcp", flip_byte, "content differs from the manifest"),
    "truncated shard": ("distcp/__0_0.distcp", truncate, "bytes, the manifest says"),
    "garbage trainer_state": ("trainer_state.pt", lambda p: p.write_bytes(b"garbage"), "bytes, the manifest says"),
    "missing .metadata": ("distcp/.metadata", lambda p: p.unlink(), "missing"),
    "garbage manifest": ("manifest.json", lambda p: p.write_text("{not json"), "unreadable manifest"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file(tokenizer, run_copy, kind):
    name, damage, message = DAMAGE[kind]
    damage(run_copy / "checkpoint-4" / name)
    with pytest.raises(CheckpointError) as error:
        sft(tokenizer, run_copy / "resumed", resume_from=str(run_copy / "checkpoint-4"))
    text = str(error.value)
    assert text.startswith(f"resume_from: {run_copy / 'checkpoint-4'} cannot be resumed: ") and message in text
    assert name.split("/")[-1] in text
    assert f"the newest verified checkpoint beside it is {run_copy / 'final'}" in text


def test_latest_skips_damaged_checkpoints_and_resumes_the_newest_verified(tokenizer, run_copy):
    flip_byte(run_copy / "checkpoint-4" / "model" / "model.safetensors")
    truncate(run_copy / "final" / "distcp" / "__0_0.distcp")
    with pytest.warns(UserWarning, match="skipping .*final") as warned:
        trainer = sft(tokenizer, run_copy, resume_from="latest")
    assert any("skipping" in str(w.message) and "checkpoint-4" in str(w.message) for w in warned)
    assert trainer.global_step == 2
    shutil.rmtree(run_copy / "checkpoint-2")
    with pytest.warns(UserWarning, match="no usable checkpoint .* starting from scratch"):
        assert sft(tokenizer, run_copy, resume_from="latest").global_step == 0


def test_a_checkpoint_without_manifest_loads_with_a_warning_and_load_errors_name_resume_from(tokenizer, run_copy):
    checkpoint = run_copy / "checkpoint-2"
    (checkpoint / "manifest.json").unlink()  # as written before manifests existed
    with pytest.warns(UserWarning, match="has no manifest.json .* cannot be verified"):
        assert sft(tokenizer, run_copy / "a", resume_from=str(checkpoint)).global_step == 2
    (checkpoint / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cannot be verified"), \
            pytest.raises(CheckpointError, match=f"resume_from: cannot load {checkpoint}: .*trainer_state.pt"):
        sft(tokenizer, run_copy / "b", resume_from=str(checkpoint))


def test_a_checkpoint_of_another_trainer_is_refused_by_name(tokenizer, finished_run, tmp_path):
    pairs = [{"prompt": p, "chosen": "the room was great .", "rejected": "the room was awful ."} for p in PROMPTS]
    args = RewardConfig(output_dir=str(tmp_path), max_steps=4, resume_from=str(finished_run / "checkpoint-2"), **QUIET)
    with pytest.raises(CheckpointError, match="is a checkpoint of the sft trainer, not of the reward trainer"):
        RewardTrainer(model=tiny(tokenizer, "rm"), args=args, train_dataset=pairs, processing_class=tokenizer)


def test_final_is_a_link_replaced_in_one_rename(tokenizer, run_copy):
    assert os.readlink(run_copy / "final") == "final-v1"
    assert not manifest.verify(str(run_copy / "final"))
    trainer = sft(tokenizer, run_copy, resume_from=str(run_copy / "checkpoint-2"))
    trainer.train()  # saves final again
    assert os.readlink(run_copy / "final") == "final-v2"
    assert not (run_copy / "final-v1").exists() and not manifest.verify(str(run_copy / "final"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(run_copy / "final" / "model")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), trainer.model.parameters()))


def test_stale_temporaries_are_removed_and_a_complete_one_restored(tokenizer, run_copy):
    junk = run_copy / ".checkpoint-6.tmp-999999"
    (junk / "distcp").mkdir(parents=True)
    (run_copy / ".checkpoint-4.tmp-999999.old").mkdir()
    (run_copy / "final-v7").mkdir()  # a version the link does not point to
    os.rename(run_copy / "checkpoint-2", run_copy / ".checkpoint-2.tmp-999998")  # killed between the two renames
    sft(tokenizer, run_copy, resume_from="latest")
    left = sorted(os.listdir(run_copy))
    assert not [n for n in left if ".tmp-" in n] and "final-v7" not in left, left
    assert "checkpoint-2" in left and not manifest.verify(str(run_copy / "checkpoint-2"))


# ---- two runs on one directory ---------------------------------------------------------------------------------

HOLD = """
import sys, time
from rlhf_fast.trainers.locking import OutputDirLock
lock = OutputDirLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(120)
"""


def hold_lock(directory):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": ROOT})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_refuses_a_busy_directory_and_takes_over_a_dead_owners_lock(tokenizer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = hold_lock(out)
    try:
        with pytest.raises(OutputDirBusy, match=f"output_dir {out} is in use by another run \\(pid {holder.pid} on host"):
            sft(tokenizer, out)
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.warns(UserWarning, match=f"taking over the lock of a run that ended without releasing it \\(pid {holder.pid}"):
        trainer = sft(tokenizer, out)
    trainer.train()
    assert (out / "rlhf_fast.lock").read_text() == ""  # released at the end


def test_a_newer_trainer_in_the_same_process_takes_the_directory_over(tokenizer, tmp_path):
    older = sft(tokenizer, tmp_path)
    newer = sft(tokenizer, tmp_path)
    with pytest.raises(OutputDirBusy, match="taken over by a newer trainer in this process"):
        older.train()
    newer.train()
    assert sft(tokenizer, tmp_path).train()  # after a finished run the directory is free again


# ---- kill -9 during checkpoint writes ---------------------------------------------------------------------------

def cli_run(workspace, steps, extra=""):
    config = workspace / "run.yaml"
    config.write_text(f"model: policy\ntrain_file: sft.jsonl\noutput_dir: out\nmax_steps: {steps}\nsave_steps: 1\n"
                      "learning_rate: 1.0e-2\nper_device_train_batch_size: 4\ndisable_tqdm: true\nplot: false\n"
                      f"report_to: [jsonl]\n{extra}")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "rlhf_fast.cli", "sft", "--config", str(config)], cwd=workspace,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def workspace(tmp_path, tokenizer):
    tiny(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_DATA))
    return tmp_path


def published(out):
    return [out / n for n in sorted(os.listdir(out)) if n.startswith("checkpoint-") or n == "final"]


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_then_resume_reproduces_the_uninterrupted_run(workspace):
    from safetensors.torch import load_file

    steps, rng, out = 12, random.Random(0), workspace / "out"
    kills = 0
    for attempt in range(4):
        process = cli_run(workspace, steps, extra="resume_from: latest\n")
        deadline = time.time() + 600
        while process.poll() is None and time.time() < deadline:  # wait for a checkpoint write to start
            if out.is_dir() and any(".tmp-" in n for n in os.listdir(out)):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.08))  # then kill at a random moment inside or just after it
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate()
        for checkpoint in published(out):  # whatever has its name is complete and verifies
            assert not manifest.verify(str(checkpoint)), (checkpoint, manifest.verify(str(checkpoint)))
    assert kills >= 3
    process = cli_run(workspace, steps, extra="resume_from: latest\n")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    resumed = load_file(out / "final" / "model" / "model.safetensors")

    shutil.move(str(out), str(workspace / "interrupted"))
    process = cli_run(workspace, steps)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    uninterrupted = load_file(out / "final" / "model" / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    steps_logged = [json.loads(line)["step"] for line in (workspace / "interrupted" / "metrics.jsonl").open()]
    assert steps_logged == list(range(1, steps + 1))


@pytest.mark.slow
def test_two_cli_runs_on_one_directory(workspace):
    first = cli_run(workspace, 100000)
    lock = workspace / "out" / "rlhf_fast.lock"
    deadline = time.time() + 600
    while not (lock.is_file() and lock.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    try:
        second = cli_run(workspace, 2)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("rlhf-fast sft: error: output_dir") and f"pid {first.pid}" in last, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
