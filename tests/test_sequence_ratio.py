"""importance_sampling_level="sequence" (GSPO): the reference against a direct computation, and the Triton kernels
(ppo_policy_loss, fused_ppo_loss; interpreter on CPU) against the reference, forward and backward."""
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.reference.losses import AGG_MODES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 70


def inputs(rows=4, steps=9, seed=0, per_seq=False, isw=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(rows, steps, generator=g) * 0.5 - 1.0
    logp = old + torch.randn(rows, steps, generator=g) * 0.3
    adv = torch.randn(rows, generator=g) if per_seq else torch.randn(rows, steps, generator=g)
    mask = torch.rand(rows, steps, generator=g) > 0.3
    mask[:, 0] = True
    if rows > 2:
        mask[2] = False  # a fully masked row
    weights = torch.rand(rows, steps, generator=g) + 0.5 if isw else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(logp), cast(old), cast(adv), mask.to(DEVICE), cast(weights)


def test_reference_is_the_gspo_objective(backend):
    """Loss and gradient against GSPO written out in plain PyTorch (Zheng et al. 2025, eq. 5-7)."""
    backend("torch")
    logp, old, adv, mask, _ = inputs(per_seq=True)
    x = logp.clone().requires_grad_(True)
    loss, stats = ops.ppo_policy_loss(x, old, adv, mask, clip_low=0.1, clip_high=0.15,
                                      agg="seq-mean-token-mean", importance_sampling_level="sequence")
    loss.backward()

    y = logp.clone().requires_grad_(True)
    m = mask.float()
    s = torch.exp(((y - old) * m).sum(-1) / m.sum(-1).clamp(min=1))  # length-normalised sequence ratio
    per_seq = torch.maximum(-adv * s, -adv * s.clamp(0.9, 1.15))
    has = m.sum(-1) > 0
    direct = per_seq[has].mean()  # every token of a row carries the same loss: seq-mean-token-mean = mean of rows
    direct.backward()
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(x.grad, y.grad)
    ratio_mean = (s[:, None].expand_as(m) * m).sum() / m.sum()
    torch.testing.assert_close(stats["ratio_mean"], ratio_mean)


def test_every_token_of_a_row_gets_the_same_gradient(backend):
    """Sequence level: each valid token reaches the loss only through the row's mean log-ratio, so with one
    advantage per row and token-sum aggregation all of a row's valid tokens get one gradient; token level: not."""
    backend("torch")
    logp, old, adv, mask, _ = inputs(rows=2, steps=12, per_seq=True)
    for level, equal in (("sequence", True), ("token", False)):
        x = logp.clone().requires_grad_(True)
        ops.ppo_policy_loss(x, old, adv, mask, agg="token-sum", importance_sampling_level=level)[0].backward()
        row = x.grad[0][mask[0]]
        assert torch.allclose(row, row[0].expand_as(row)) == equal, level
        assert (x.grad[~mask] == 0).all()


def _policy(backend, name, logp, old, adv, mask, upstream, **kw):
    backend(name)
    x = logp.detach().clone().requires_grad_(True)
    loss, stats = ops.ppo_policy_loss(x, old, adv, mask, importance_sampling_level="sequence", **kw)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss, stats, grad


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("shape", [(4, 9), (3, 1), (2, 1100)], ids=["4x9", "T=1", "T=1100"])
@pytest.mark.parametrize("per_seq, isw, dual", [(False, False, None), (True, True, 3.0)], ids=["plain", "all"])
def test_policy_kernel_matches_the_reference(backend, agg, shape, per_seq, isw, dual):
    logp, old, adv, mask, w = inputs(*shape, per_seq=per_seq, isw=isw)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual, agg=agg, is_weights=w)
    expected = _policy(backend, "torch", logp, old, adv, mask, 0.7, **kw)
    got = _policy(backend, "triton", logp, old, adv, mask, 0.7, **kw)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    assert set(got[1]) == set(expected[1])
    for key in expected[1]:
        torch.testing.assert_close(got[1][key], expected[1][key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(got[2], expected[2], atol=1e-6, rtol=1e-5)


def test_policy_kernel_in_half_precision(backend):
    logp, old, adv, mask, w = inputs(seed=3, isw=True, dtype=torch.float16)
    expected = _policy(backend, "torch", logp.float(), old.float(), adv.float(), mask, 1.0, is_weights=w.float())
    got = _policy(backend, "triton", logp, old, adv, mask, 1.0, is_weights=w)
    torch.testing.assert_close(got[0], expected[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[2].float(), expected[2], atol=2e-2, rtol=2e-2)


def _fused(backend, name, batch, inplace, **kw):
    backend(name)
    logits = batch["logits"].detach().clone().requires_grad_(True)
    work = logits * 1.0  # a non-leaf buffer, so the in-place path can run
    loss, stats = ops.fused_ppo_loss(work, batch["labels"], batch["old"], batch["adv"], batch["mask"],
                                     importance_sampling_level="sequence", inplace_grad=inplace, **kw)
    (loss * 0.5).backward()
    return loss, stats, logits.grad


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("inplace", [True, False])
def test_fused_kernel_matches_the_reference(backend, monkeypatch, agg, inplace):
    from rlhf_fast.kernels import logprobs

    if DEVICE == "cpu":
        monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 32)  # several vocabulary chunks under the interpreter
    g = torch.Generator().manual_seed(1)
    rows, steps = 3, 6
    logits = torch.randn(rows, steps, V, generator=g) * 2
    labels = torch.randint(0, V, (rows, steps), generator=g)
    logp = torch.log_softmax(logits / 0.8, -1).gather(-1, labels[..., None])[..., 0]
    _, _, adv, mask, w = inputs(rows, steps, seed=2, per_seq=True, isw=True)
    batch = dict(logits=logits.to(DEVICE), labels=labels.to(DEVICE), old=(logp + 0.3 * torch.randn(
        rows, steps, generator=g)).to(DEVICE), adv=adv, mask=mask)
    kw = dict(ref_logp=batch["old"] - 0.1, kl_coef=0.1, entropy_coef=0.01, temperature=0.8, clip_low=0.2,
              clip_high=0.28, dual_clip=3.0, agg=agg, is_weights=w, loss_scale=11.0)
    expected = _fused(backend, "torch", batch, inplace, **kw)
    got = _fused(backend, "triton", batch, inplace, **kw)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    for key in expected[1]:
        torch.testing.assert_close(got[1][key], expected[1][key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(got[2], expected[2], atol=1e-6, rtol=1e-5)


def test_fused_linear_takes_the_option(backend):
    """fused_linear_ppo_loss composes the reference's policy terms: same numbers as the logits path."""
    backend("torch")
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(V, 8, generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    old, adv, mask = torch.randn(2, 5, generator=g) - 4, torch.randn(2, generator=g), torch.ones(2, 5)
    a, _ = ops.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, importance_sampling_level="sequence")
    b, _ = ops.fused_ppo_loss(hidden @ weight.T, labels, old, adv, mask, importance_sampling_level="sequence")
    torch.testing.assert_close(a, b)


def test_unknown_level_is_refused():
    logp, old, adv, mask, _ = inputs()
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ops.ppo_policy_loss(logp, old, adv, mask, importance_sampling_level="seq")
