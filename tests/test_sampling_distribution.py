"""With top_k / top_p the trainer's log-probs are those of the truncated, renormalised distribution that
``generate`` samples from: checked against a hand-written truncation, against generate's own samples, and in the
trainer (old log-probs, and a ratio of exactly 1 at the old parameters)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from rlhf_fast import PPOConfig, PPOTrainer, ops  # noqa: E402
from rlhf_fast.demo import task  # noqa: E402
from rlhf_fast.demo.model import tiny_llama_config  # noqa: E402
from rlhf_fast.rollout.generation import generate  # noqa: E402
from rlhf_fast.trainers.sampling import kept_tokens, truncate_logits  # noqa: E402

QUIET = dict(disable_tqdm=True, report_to=["jsonl"], plot=False, save_final=False)


def by_hand(logits, temperature, top_p, top_k):
    """The sampling distribution written out: softmax at the temperature, keep the top_k most likely, renormalise,
    keep the most likely tokens until the mass before them reaches top_p, renormalise."""
    probs = torch.softmax(logits.double() / temperature, -1)
    out = torch.zeros_like(probs)
    for row in range(probs.shape[0]):
        order = probs[row].argsort(descending=True)
        p = probs[row][order]
        if top_k > 0:
            p = torch.cat([p[:top_k], torch.zeros(len(p) - top_k, dtype=p.dtype)])
        p = p / p.sum()
        before = torch.cumsum(p, 0) - p
        p = torch.where(before < top_p, p, 0.0)
        out[row, order] = p / p.sum()
    return out


@pytest.mark.parametrize("top_p, top_k", [(0.8, 0), (1.0, 5), (0.7, 6)])
def test_truncated_distribution_matches_a_direct_computation(top_p, top_k):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 40, generator=g) * 2
    expected = by_hand(logits, 0.7, top_p, top_k)
    got = torch.softmax(truncate_logits(logits, temperature=0.7, top_p=top_p, top_k=top_k) / 0.7, -1)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(got == 0, expected == 0)  # dropped tokens get exactly 0
    assert torch.equal(kept_tokens(logits, temperature=0.7, top_p=top_p, top_k=top_k), expected > 0)
    labels = torch.randint(0, 40, (7,), generator=g)
    logp = ops.selective_log_softmax(truncate_logits(logits, temperature=0.7, top_p=top_p, top_k=top_k), labels,
                                     temperature=0.7)
    kept = expected.gather(-1, labels[:, None])[:, 0] > 0
    torch.testing.assert_close(logp[kept].double(), expected.gather(-1, labels[:, None])[:, 0][kept].log(),
                               atol=1e-5, rtol=1e-5)


def tiny(tokenizer, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2))


def test_generate_samples_from_that_distribution(tokenizer):
    """Many one-token samples of one prompt: never a dropped token, frequencies within 5 sigma of q."""
    model = tiny(tokenizer, seed=3).eval()
    prompt = tokenizer("anna asks : describe the hotel", add_special_tokens=False)["input_ids"]
    n = 3000
    torch.manual_seed(0)
    gen = generate(model, [prompt] * n, pad_id=tokenizer.pad_token_id, eos_id=None, max_new_tokens=1,
                   temperature=1.3, top_p=0.6, top_k=8, batch_size=n)
    counts = torch.bincount(torch.tensor([r[0] for r in gen.response_ids]), minlength=len(tokenizer))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    q = by_hand(logits[None], 1.3, 0.6, 8)[0]
    assert (counts[q == 0] == 0).all()
    assert (q > 0).sum() >= 3  # the test means something: several tokens kept, some dropped
    assert (q == 0).sum() > 0
    freq = counts.double() / n
    assert ((freq - q).abs() <= 5 * torch.sqrt(q * (1 - q) / n) + 1e-12).all()


def test_trainer_uses_the_truncated_distribution(tokenizer, tmp_path):
    prompts = [{"prompt": p} for p, _ in task.all_prompts()[:8]]
    args = PPOConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-3, per_device_train_batch_size=4,
                     response_length=5, temperature=0.9, top_p=0.7, top_k=6, num_ppo_epochs=1, num_mini_batches=1,
                     advantage_estimator="grpo", num_generations=2, kl_coef=0.0, seed=4, **QUIET)
    policy = tiny(tokenizer, seed=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy,
                         reward_model=lambda completions, **k: [float(len(c)) for c in completions],
                         train_dataset=prompts)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    exp = trainer.make_experience(trainer._prompt_batch(0))
    mask = exp["mask"].bool()
    with torch.no_grad():
        logits = policy(input_ids=exp["ids"], attention_mask=exp["attention"]).logits[:, :-1]
    labels = exp["ids"][:, 1:]
    q = by_hand(logits.reshape(-1, logits.shape[-1]), 0.9, 0.7, 6).view(logits.shape)
    q_label = q.gather(-1, labels[..., None])[..., 0]
    assert (q_label[mask] > 0).all()  # every sampled token is in the kept set
    torch.testing.assert_close(exp["old_logp"][mask].double(), q_label[mask].log(), atol=1e-5, rtol=1e-5)
    full = torch.log_softmax(logits / 0.9, -1).gather(-1, labels[..., None])[..., 0]
    assert (exp["old_logp"][mask] - full[mask] > 1e-3).any()  # the full softmax would have been another number
    stats = trainer.update(exp)  # one epoch, one minibatch: the loss runs at the old parameters
    assert stats["approx_kl"] < 1e-10 and stats["clip_frac"] == 0.0
    assert any(not torch.equal(start[k], v) for k, v in policy.state_dict().items())


def test_truncation_needs_the_logits():
    for kwargs in (dict(logprobs_from_hidden=True), dict(critic="value_head")):
        with pytest.raises(ValueError, match="top_p / top_k: the log-probs of a truncated sampling distribution"):
            PPOConfig(top_p=0.9, **kwargs)
    with pytest.raises(ValueError, match=r"top_k: expected a value in \[0, inf\)"):
        PPOConfig(top_k=-1)


def test_truncation_with_the_vllm_engine_is_refused():
    """vllm's log-probs (the importance weights) are not those of the truncated distribution the trainer uses."""
    for kwargs in (dict(top_p=0.9), dict(top_k=5)):
        with pytest.raises(ValueError, match="rollout_engine: vllm"):
            PPOConfig(rollout_engine="vllm", **kwargs)
    PPOConfig(rollout_engine="vllm")  # untruncated sampling stays allowed
