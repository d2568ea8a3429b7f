"""Data-parallel training under torchrun equals one process on the same global batch (2 CPU ranks, gloo).

One ``torchrun --standalone --nproc_per_node 2`` launch runs this file as a script: an SFT and a reward-model
update, a PPO step (GAE, trained critic, KL in the reward, two minibatches, micro-batches from the batcher), a GRPO
step and PPO / GRPO steps with ``logprobs_from_hidden`` (fused linear log-probs and loss inside the wrapped
``FusedLinearLM``; untied and tied embeddings) under DDP and under FSDP2, each with ``per_device_train_batch_size``
= half the single-process batch; rank 0 writes the checkpoints. The tests then run the same updates in one process (``distributed="none"``) and compare the
parameters, and resume a 2-rank FSDP2 checkpoint in one process.

Rollouts: sampling with ``generate`` draws from the global RNG of each rank, so which rank samples a prompt
changes the sample; no split of a batch can reproduce one process's draws. The PPO runs therefore replace
``_generate`` with a fixed, split-invariant stand-in (``fixed_rollouts``: each response a function of its
prompt, its index among the prompt's samples and the step). Everything after generation is the real code path:
the all-gather of the rollouts, the batcher's cross-rank plan, the scoring passes summed over ranks, advantages
and whitening on the global batch, and the update with globally normalised losses.

Every run is on packed micro-batches (``padding_free: auto``; the runs assert it), and one (the value head on the
fused linear path) with ``gradient_checkpointing``.
"""
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import load_tokenizer, tiny_llama_config  # noqa: E402
from rlhf_fast.rollout.generation import Generation  # noqa: E402

RANKS = 2
STRATEGIES = ("ddp", "fsdp2")
# adam_epsilon=1 and no clipping make AdamW's step nearly linear in the gradient (lr * g / (|g| + 1)), so a wrong
# loss normalisation shows in the parameters; with eps=1e-8 the first step is about lr * sign(g) and would hide it
QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, adam_epsilon=1.0, max_grad_norm=None)
PROMPTS = [p for p, _ in task.all_prompts()[:16]]
TOLERANCE = 1e-5


def tiny(tokenizer, kind="lm", seed=0, tie=False):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2)
    config.tie_word_embeddings = tie
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    return cls(config)


# ---- the runs (the same code in the torchrun workers and in the single-process references) -------------------
def reward_run(tokenizer, out, world, **overrides):
    pairs = [{"prompt": p, "chosen": "the room was great and the pool was fine .", "rejected": "the room was awful ."}
             for p in PROMPTS[:12]]
    args = RewardConfig(output_dir=str(out), max_steps=2, learning_rate=0.3, per_device_train_batch_size=8 // world,
                        center_rewards_coefficient=0.01, gradient_accumulation_steps=1, **QUIET, **overrides)
    trainer = RewardTrainer(model=tiny(tokenizer, "rm"), args=args, train_dataset=pairs, processing_class=tokenizer)
    assert trainer.packed  # padding_free: auto packs the micro-batches, in every rank and in one process
    trainer.train()
    return trainer


def sft_run(tokenizer, out, world, **overrides):
    """Completions of different lengths, 2 accumulation steps: the loss divides by the step's global tokens."""
    completions = ["the room was great .", "the pool was fine and the staff was nice and the food was bad ."]
    data = [{"prompt": p, "completion": completions[i % 2]} for i, p in enumerate(PROMPTS[:12])]
    args = SFTConfig(output_dir=str(out), max_steps=2, learning_rate=0.3, per_device_train_batch_size=4 // world,
                     gradient_accumulation_steps=2, **QUIET, **overrides)
    trainer = SFTTrainer(model=tiny(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.packed
    trainer.train()
    return trainer


def positive_fraction(prompts, completions):
    """A reward function (texts in, scores out): the share of positive adjectives among the response words."""
    return [sum(w in task.POSITIVE for w in c.split()) / max(1, len(c.split())) for c in completions]


def fixed_rollouts(trainer):
    """Replace sampling by a response that depends only on (prompt, sample index within the prompt, step)."""
    vocab = len(trainer.tokenizer)
    eos = trainer.eos_id

    def generate(prompt_ids, **_):
        responses, stopped = [], []
        for n, prompt in enumerate(prompt_ids):
            sample = 0
            while n - sample - 1 >= 0 and prompt_ids[n - sample - 1] == prompt:
                sample += 1  # GRPO-style copies of one prompt are adjacent and never split across ranks
            key = zlib.crc32(repr((prompt, sample, trainer.global_step)).encode())
            g = torch.Generator().manual_seed(key)
            length = int(torch.randint(2, trainer.args.response_length + 1, (1,), generator=g))
            tokens = torch.randint(4, vocab, (length,), generator=g).tolist()
            ends = bool(torch.rand((), generator=g) < 0.6)
            responses.append(tokens[:-1] + [eos] if ends else tokens)
            stopped.append(ends)
        return Generation(prompt_ids=list(prompt_ids), response_ids=responses, stopped=stopped)

    trainer._generate = generate
    return trainer


# GRPO with a reward function, minibatches of 3 sequences and a 16-token budget: one rank gets one sequence, the
# other two in two micro-batches, so the first runs a zero-weight placeholder pass (counted by the worker)
GRPO = dict(advantage_estimator="grpo", num_generations=2, num_mini_batches=4, max_tokens_per_micro_batch=16,
            prompts_per_step=6, reward_model=positive_fraction)
# logprobs_from_hidden: old / reference log-probs by linear_logprobs and the policy loss by fused_linear_ppo_loss,
# from the last hidden states and the LM head, inside the wrapped module's forward; KL and entropy in the loss so
# that the reference log-probs (another model's) and the entropy term reach the gradient. Untied (GAE with a critic) and tied
# embeddings (GRPO, uneven micro-batches with placeholder passes).
FROM_HIDDEN = {
    "hidden": dict(logprobs_from_hidden=True, kl_penalty="loss", kl_estimator="k3", kl_coef=0.5, entropy_coef=0.05,
                   ref_seed=2),
    "hidden-tied": dict(GRPO, logprobs_from_hidden=True, kl_penalty="loss", kl_estimator="k2", kl_coef=0.5,
                        entropy_coef=0.05, tie=True, ref_seed=2),
}
# critic="value_head": the critic is a head on the policy's last hidden states, inside the wrapped module (its
# gradient all-reduced by DDP, its parameters sharded by FSDP2 with the root). GAE with the reward model, KL in the
# reward, logits path; and the fused linear path with tied embeddings, a reward function, KL and entropy in the loss
# and 3-sequence minibatches on a 16-token budget (uneven micro-batches: placeholder passes through the head too).
VALUE_HEAD = {
    "value-head": dict(critic="value_head", vf_coef=0.5),
    "value-head-hidden": dict(critic="value_head", vf_coef=0.5, logprobs_from_hidden=True, kl_penalty="loss",
                              gradient_checkpointing=True,
                              kl_estimator="k3", kl_coef=0.5, entropy_coef=0.05, tie=True, ref_seed=2,
                              reward_model=positive_fraction, prompts_per_step=6, max_tokens_per_micro_batch=16),
}


def ppo_trainer(tokenizer, out, world, prompts_per_step=8, reward_model=None, tie=False, ref_seed=0, **overrides):
    settings = dict(output_dir=str(out), max_steps=2, learning_rate=0.3, response_length=6, temperature=1.0,
                    num_ppo_epochs=2, num_mini_batches=2, seed=3, max_tokens_per_micro_batch=32, **QUIET)
    args = PPOConfig(**{**settings, **overrides, "per_device_train_batch_size": prompts_per_step // world})
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=tiny(tokenizer, tie=tie),
                         ref_model=tiny(tokenizer, seed=ref_seed, tie=tie),
                         reward_model=reward_model or tiny(tokenizer, "rm", seed=1),
                         train_dataset=[{"prompt": p} for p in PROMPTS])
    assert trainer.packed
    return fixed_rollouts(trainer)


def ppo_run(tokenizer, out, world, steps, **overrides):
    trainer = ppo_trainer(tokenizer, out, world, **overrides)
    trainer.num_ppo_steps = steps  # the schedule of a 2-step run, stopped after `steps`
    trainer.train()
    return trainer


def worker(out: str) -> None:
    """What each torchrun rank runs: every scenario, one after the other, in one process group."""
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    for strategy in STRATEGIES:
        sft_run(tokenizer, os.path.join(out, f"sft-{strategy}"), RANKS, distributed=strategy)
        reward_run(tokenizer, os.path.join(out, f"rm-{strategy}"), RANKS, distributed=strategy)
        ppo_run(tokenizer, os.path.join(out, f"ppo-{strategy}"), RANKS, steps=1, distributed=strategy, save_steps=1,
                save_final=False)
        trainer = ppo_trainer(tokenizer, os.path.join(out, f"grpo-{strategy}"), RANKS, distributed=strategy, **GRPO)
        trainer.num_ppo_steps = 1
        placeholders = count_placeholder_passes(trainer)
        trainer.train()
        with open(os.path.join(out, f"grpo-{strategy}", f"placeholders_{trainer.dist.rank}.json"), "w") as handle:
            json.dump(placeholders, handle)
        for name, overrides in FROM_HIDDEN.items():
            ppo_run(tokenizer, os.path.join(out, f"ppo-{name}-{strategy}"), RANKS, steps=1, distributed=strategy,
                    **overrides)
        for name, overrides in VALUE_HEAD.items():
            trainer = ppo_trainer(tokenizer, os.path.join(out, f"ppo-{name}-{strategy}"), RANKS,
                                  distributed=strategy, save_steps=1, **overrides)
            trainer.num_ppo_steps = 1
            placeholders = count_placeholder_passes(trainer)
            trainer.train()
            with open(os.path.join(out, f"ppo-{name}-{strategy}", f"placeholders_{trainer.dist.rank}.json"), "w") as f:
                json.dump(placeholders, f)
        # real sampling through FusedLinearLM.generate (under FSDP2 a registered forward method of the root)
        trainer = ppo_trainer(tokenizer, os.path.join(out, f"ppo-hidden-sampled-{strategy}"), RANKS,
                              distributed=strategy, **FROM_HIDDEN["hidden-tied"])
        del trainer._generate  # back to the class's sampling
        trainer.num_ppo_steps = 1
        trainer.train()


def count_placeholder_passes(trainer) -> dict:
    counts = {"placeholder": 0, "real": 0}
    inner = trainer._micro_batch_loss

    def counting(*args, loss_weight=1.0, **kwargs):
        counts["placeholder" if loss_weight == 0.0 else "real"] += 1
        return inner(*args, loss_weight=loss_weight, **kwargs)

    trainer._micro_batch_loss = counting
    return counts


# ---- the tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Run ``worker`` on 2 gloo ranks with torchrun (a free port from --standalone); returns the output folder."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
               __file__, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


def saved_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_parameters(saved: dict, model: torch.nn.Module, initial: torch.nn.Module, what: str) -> None:
    """``saved`` (the 2-rank run) equals ``model`` (one process) within TOLERANCE, and both moved from ``initial``."""
    expected = model.state_dict()
    assert sorted(saved) == sorted(expected), what
    worst = max(float((saved[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= TOLERANCE, f"{what}: largest parameter difference {worst:.3g} > {TOLERANCE}"
    moved = max(float((expected[k] - v).abs().max()) for k, v in initial.state_dict().items())
    assert moved > 100 * TOLERANCE, f"{what}: the update barely moved the parameters ({moved:.3g})"
    print(f"{what}: max |2 ranks - 1 process| = {worst:.2e} (update moved parameters by up to {moved:.2e})")


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_sft_update_equals_one_process(two_rank_runs, tokenizer, tmp_path, strategy):
    single = sft_run(tokenizer, tmp_path, 1, distributed="none")
    assert_same_parameters(saved_weights(two_rank_runs / f"sft-{strategy}" / "final" / "model"), single.model,
                           tiny(tokenizer), f"SFT, {strategy}")
    ranks, one = read_metrics(two_rank_runs / f"sft-{strategy}"), single.logger.history
    assert [r["loss"] for r in ranks] == pytest.approx([r["loss"] for r in one], abs=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_reward_update_equals_one_process(two_rank_runs, tokenizer, tmp_path, strategy):
    single = reward_run(tokenizer, tmp_path, 1, distributed="none")
    assert_same_parameters(saved_weights(two_rank_runs / f"rm-{strategy}" / "final" / "model"), single.model,
                           tiny(tokenizer, "rm"), f"reward model, {strategy}")
    ranks, one = read_metrics(two_rank_runs / f"rm-{strategy}"), single.logger.history
    for key in ("loss", "accuracy", "grad_norm"):
        assert [r[key] for r in ranks] == pytest.approx([r[key] for r in one], abs=1e-5), key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_ppo_update_equals_one_process(two_rank_runs, tokenizer, tmp_path, strategy):
    single = ppo_run(tokenizer, tmp_path, 1, steps=1, distributed="none")
    checkpoint = two_rank_runs / f"ppo-{strategy}" / "checkpoint-1"
    assert_same_parameters(saved_weights(checkpoint / "model"), single.policy, tiny(tokenizer), f"policy, {strategy}")
    assert_same_parameters(saved_weights(checkpoint / "value_model"), single.value_model, tiny(tokenizer, "rm", seed=1),
                           f"critic, {strategy}")
    ranks, one = read_metrics(two_rank_runs / f"ppo-{strategy}"), single.logger.history
    for key in ("reward", "kl", "pg_loss", "vf_loss", "clip_frac", "approx_kl", "grad_norm", "response_length"):
        assert ranks[0][key] == pytest.approx(one[0][key], abs=1e-5), key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_grpo_update_with_uneven_micro_batches_equals_one_process(two_rank_runs, tokenizer, tmp_path,
                                                                              strategy):
    single = ppo_trainer(tokenizer, tmp_path, 1, distributed="none", **GRPO)
    single.num_ppo_steps = 1
    single.train()
    folder = two_rank_runs / f"grpo-{strategy}"
    final = saved_weights(folder / "final" / "model")
    assert_same_parameters(final, single.policy, tiny(tokenizer), f"GRPO policy, {strategy}")
    passes = [json.loads((folder / f"placeholders_{r}.json").read_text()) for r in range(RANKS)]
    assert sum(p["placeholder"] for p in passes) > 0, passes  # the uneven plan was exercised
    assert len({p["placeholder"] + p["real"] for p in passes}) == 1, passes  # ... with equal pass counts
    assert read_metrics(folder)[0]["reward"] == pytest.approx(single.logger.history[0]["reward"], abs=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(FROM_HIDDEN))
def test_distributed_ppo_logprobs_from_hidden_equals_one_process(two_rank_runs, tokenizer, tmp_path, strategy, name):
    """The fused linear path (no [N, V] logits) under DDP / FSDP2: its gradients are all-reduced (DDP) and its
    head and embedding gathered (FSDP2) because it runs inside the wrapped FusedLinearLM's forward."""
    overrides = FROM_HIDDEN[name]
    single = ppo_run(tokenizer, tmp_path, 1, steps=1, distributed="none", **overrides)
    tie = overrides.get("tie", False)
    policy = single.policy
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tie  # still tied after training
    folder = two_rank_runs / f"ppo-{name}-{strategy}"
    saved = saved_weights(folder / "final" / "model")
    if tie:  # save_pretrained writes a tied matrix once
        saved.setdefault("lm_head.weight", saved.get("model.embed_tokens.weight"))
    assert_same_parameters(saved, policy, tiny(tokenizer, tie=tie), f"policy, {name}, {strategy}")
    if single.value_model is not None:
        assert_same_parameters(saved_weights(folder / "final" / "value_model"), single.value_model,
                               tiny(tokenizer, "rm", seed=1), f"critic, {name}, {strategy}")
    ranks, one = read_metrics(folder), single.logger.history
    for key in ("reward", "kl", "pg_loss", "entropy", "clip_frac", "approx_kl", "grad_norm"):
        assert ranks[0][key] == pytest.approx(one[0][key], abs=1e-5), key


def initial_value_head(tokenizer, tie=False):
    from rlhf_fast.modeling import CausalLMWithValueHead

    return CausalLMWithValueHead(tiny(tokenizer, tie=tie), generator=torch.Generator().manual_seed(3)).value_head


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(VALUE_HEAD))
def test_distributed_ppo_value_head_equals_one_process(two_rank_runs, tokenizer, tmp_path, strategy, name):
    """critic="value_head" under DDP / FSDP2: the policy (saved by save_pretrained, no head keys in it) and the
    head (value_head.safetensors beside it) equal the one-process update."""
    from safetensors.torch import load_file

    overrides = VALUE_HEAD[name]
    single = ppo_run(tokenizer, tmp_path, 1, steps=1, distributed="none", **overrides)
    assert single.value_model is None
    tie = overrides.get("tie", False)
    folder = two_rank_runs / f"ppo-{name}-{strategy}"
    for saved_at in ("checkpoint-1", "final"):
        saved = saved_weights(folder / saved_at / "model")
        assert not [k for k in saved if "value_head" in k], saved_at
        if tie:
            saved.setdefault("lm_head.weight", saved.get("model.embed_tokens.weight"))
        assert_same_parameters(saved, single.policy, tiny(tokenizer, tie=tie), f"policy, {name}, {strategy}")
        head = load_file(folder / saved_at / "model" / "value_head.safetensors")
        assert_same_parameters(head, single.value_head, initial_value_head(tokenizer, tie),
                               f"value head, {name}, {strategy}")
    ranks, one = read_metrics(folder), single.logger.history
    # (not vf_clip_frac: "clipped > unclipped" compares two roundings of one number while the values are within
    # the clip range, so it flips with 1e-8 differences of micro-batch shapes)
    for key in ("reward", "kl", "pg_loss", "vf_loss", "entropy", "clip_frac", "approx_kl", "grad_norm"):
        assert ranks[0][key] == pytest.approx(one[0][key], abs=1e-5), key
    if "max_tokens_per_micro_batch" in overrides:
        passes = [json.loads((folder / f"placeholders_{r}.json").read_text()) for r in range(RANKS)]
        assert sum(p["placeholder"] for p in passes) > 0, passes
        assert len({p["placeholder"] + p["real"] for p in passes}) == 1, passes


@pytest.mark.parametrize("name", list(VALUE_HEAD))
def test_distributed_fsdp2_value_head_checkpoint_resumes_on_one_process(two_rank_runs, tokenizer, tmp_path, name):
    """The head is in the DCP state (sharded under FSDP2) with its AdamW moments: a 2-rank FSDP2 checkpoint
    resumes in one process and continues like an uninterrupted single-process run."""
    overrides = VALUE_HEAD[name]
    checkpoint = two_rank_runs / f"ppo-{name}-fsdp2" / "checkpoint-1"
    uninterrupted = ppo_run(tokenizer, tmp_path / "full", 1, steps=2, distributed="none", **overrides)
    resumed = ppo_trainer(tokenizer, tmp_path / "resumed", 1, distributed="none", resume_from=str(checkpoint),
                          **overrides)
    assert resumed.global_step == 1
    resumed.train()
    for what in ("policy", "value_head"):
        full, part = getattr(uninterrupted, what).state_dict(), getattr(resumed, what).state_dict()
        worst = max(float((full[k] - part[k]).abs().max()) for k in full)
        assert worst <= TOLERANCE, f"{what}: resumed run differs from the uninterrupted one by {worst:.3g}"
    for key in ("reward", "kl", "pg_loss", "vf_loss"):
        assert resumed.logger.history[-1][key] == pytest.approx(uninterrupted.logger.history[-1][key], abs=1e-5)


def test_distributed_ppo_logprobs_from_hidden_samples_alike_under_ddp_and_fsdp2(two_rank_runs, tokenizer):
    """Real sampling with logprobs_from_hidden: under FSDP2 the policy's FusedLinearLM is the sharded root and
    samples through its registered ``generate``. Each rank draws from its own seed (seed + rank) either way, so
    DDP and FSDP2 sample the same responses and end at the same parameters."""
    ddp, fsdp2 = (two_rank_runs / f"ppo-hidden-sampled-{s}" for s in STRATEGIES)
    first, second = read_metrics(ddp)[0], read_metrics(fsdp2)[0]
    for key in ("reward", "kl", "pg_loss", "entropy", "response_length", "grad_norm"):
        assert second[key] == pytest.approx(first[key], abs=1e-5), key
    a, b = saved_weights(ddp / "final" / "model"), saved_weights(fsdp2 / "final" / "model")
    for saved in (a, b):  # a tied matrix: DDP's save_pretrained writes it once, FSDP2's gathered state twice
        saved.setdefault("lm_head.weight", saved["model.embed_tokens.weight"])
    assert sorted(a) == sorted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE
    assert max(float((a[k] - v).abs().max()) for k, v in tiny(tokenizer, tie=True).state_dict().items()
               if k in a) > 100 * TOLERANCE


def test_distributed_fsdp2_checkpoint_resumes_on_one_process(two_rank_runs, tokenizer, tmp_path):
    checkpoint = two_rank_runs / "ppo-fsdp2" / "checkpoint-1"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["strategy"]) == (1, 2, "fsdp2")
    assert not [p for p in os.listdir(two_rank_runs / "ppo-fsdp2") if ".tmp" in p]  # renamed into place
    uninterrupted = ppo_run(tokenizer, tmp_path / "full", 1, steps=2, distributed="none")
    resumed = ppo_trainer(tokenizer, tmp_path / "resumed", 1, distributed="none", resume_from=str(checkpoint))
    assert resumed.global_step == 1
    resumed.train()
    for name in ("policy", "value_model"):
        full, part = getattr(uninterrupted, name).state_dict(), getattr(resumed, name).state_dict()
        worst = max(float((full[k] - part[k]).abs().max()) for k in full)
        assert worst <= TOLERANCE, f"{name}: resumed run differs from the uninterrupted one by {worst:.3g}"
    for key in ("reward", "kl", "pg_loss", "vf_loss"):  # step 2 needs the restored optimizer moments and RNG
        assert resumed.logger.history[-1][key] == pytest.approx(uninterrupted.logger.history[-1][key], abs=1e-5)


if __name__ == "__main__":
    worker(sys.argv[1])
