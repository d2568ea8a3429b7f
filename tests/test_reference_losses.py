"""Reference aggregation, PPO policy / value losses and the fused composition against the definitions."""
import pytest
import torch

from rlhf_fast import reference as R

AGG_MODES = R.AGG_MODES


def agg_definition(l, m, mode, num_tokens=None, num_seqs=None, loss_scale=None):
    """Row by row, the way API.md words it."""
    l, m = l.double(), m.double()
    if mode == "token-sum":
        return (l * m).sum()
    if mode == "token-mean":
        n = m.sum() if num_tokens is None else num_tokens
        return (l * m).sum() / n if n else torch.tensor(0.0, dtype=torch.float64)
    per_row = []
    for b in range(l.shape[0]):
        if m[b].sum() == 0:
            continue
        s = (l[b] * m[b]).sum()
        per_row.append(s / m[b].sum() if mode == "seq-mean-token-mean" else s)
    seqs = len(per_row) if num_seqs is None else num_seqs
    loss = sum(per_row) / seqs if per_row else torch.tensor(0.0, dtype=torch.float64)
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (l.shape[-1] if loss_scale is None else loss_scale)
    return loss


def batch(seed=0, rows=4, steps=7):
    torch.manual_seed(seed)
    l = torch.randn(rows, steps)
    m = (torch.rand(rows, steps) > 0.3).float()
    m[1] = 0  # a row with no valid token
    return l, m


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_definition(mode):
    l, m = batch()
    torch.testing.assert_close(R.aggregate(l, m, mode).double(), agg_definition(l, m, mode))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_with_count_overrides(mode):
    l, m = batch(1)
    got = R.aggregate(l, m, mode, num_tokens=40, num_seqs=9, loss_scale=3.0)
    torch.testing.assert_close(got.double(), agg_definition(l, m, mode, 40, 9, 3.0))
    as_tensor = R.aggregate(l, m, mode, num_tokens=torch.tensor(40.0), num_seqs=torch.tensor(9), loss_scale=3.0)
    torch.testing.assert_close(as_tensor, got)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_batch_gives_zero_not_nan(mode):
    l = torch.randn(3, 5, requires_grad=True)
    loss = R.aggregate(l, torch.zeros(3, 5), mode)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(l.grad, torch.zeros(3, 5))


def policy_definition(logp, old, adv, clip_low, clip_high, dual_clip, w):
    out = torch.zeros_like(logp, dtype=torch.float64)
    for i in range(logp.numel()):
        r = torch.exp(logp.flatten()[i].double() - old.flatten()[i].double())
        a = adv.flatten()[i].double()
        l = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
        if dual_clip is not None and a < 0:
            l = min(l, -a * dual_clip)
        out.view(-1)[i] = l * (1.0 if w is None else w.flatten()[i].double())
    return out


@pytest.mark.parametrize("clip_high,dual_clip,with_weights", [(None, None, False), (0.28, None, False), (None, 3.0, True)])
def test_policy_loss_per_token_definition(clip_high, dual_clip, with_weights):
    torch.manual_seed(3)
    logp = torch.randn(3, 6) * 0.5 - 1
    old = logp + torch.randn(3, 6) * 0.6
    adv = torch.randn(3, 6) * 2
    mask = torch.ones(3, 6)
    w = torch.rand(3, 6) if with_weights else None
    loss, stats = R.ppo_policy_loss(
        logp, old, adv, mask, clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip, agg="token-sum", is_weights=w
    )
    want = policy_definition(logp, old, adv, 0.2, clip_high or 0.2, dual_clip, w)
    torch.testing.assert_close(loss.double(), want.sum(), atol=1e-5, rtol=1e-5)
    assert set(stats) >= {"clip_frac", "approx_kl", "ratio_mean"}
    ratio = torch.exp(logp - old)
    torch.testing.assert_close(stats["ratio_mean"], ratio.mean())
    torch.testing.assert_close(stats["approx_kl"], (torch.exp(old - logp) - 1 + (logp - old)).mean())
    if dual_clip is not None:
        assert "dual_clip_frac" in stats


def test_dual_clip_caps_negative_advantage_loss():
    logp, old = torch.tensor([[2.0]]), torch.tensor([[0.0]])  # ratio e^2 ~ 7.39
    adv = torch.tensor([[-1.0]])
    plain, _ = R.ppo_policy_loss(logp, old, adv, torch.ones(1, 1))
    capped, stats = R.ppo_policy_loss(logp, old, adv, torch.ones(1, 1), dual_clip=3.0)
    torch.testing.assert_close(plain, torch.exp(torch.tensor(2.0)))
    torch.testing.assert_close(capped, torch.tensor(3.0))
    assert stats["dual_clip_frac"].item() == 1.0


def test_clip_frac_counts_clipped_tokens():
    logp = torch.tensor([[0.5, 0.0, -0.5, 0.05]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])  # tokens 0 and 2 leave the trust region in the losing direction
    _, stats = R.ppo_policy_loss(logp, old, adv, torch.ones(1, 4))
    assert stats["clip_frac"].item() == pytest.approx(0.5)


def test_per_sequence_advantages_broadcast_over_time():
    torch.manual_seed(4)
    logp, old = torch.randn(3, 5), torch.randn(3, 5)
    adv_seq = torch.randn(3)
    mask = torch.rand(3, 5) > 0.2
    a, _ = R.ppo_policy_loss(logp, old, adv_seq, mask)
    b, _ = R.ppo_policy_loss(logp, old, adv_seq[:, None].expand(3, 5), mask)
    torch.testing.assert_close(a, b)


def test_policy_loss_gradient_float64():
    torch.manual_seed(5)
    logp = (torch.randn(2, 5, dtype=torch.float64) * 0.3).requires_grad_()
    old = logp.detach() + torch.randn(2, 5, dtype=torch.float64) * 0.1
    adv = torch.randn(2, 5, dtype=torch.float64)
    mask = torch.rand(2, 5) > 0.3
    for mode in AGG_MODES:
        assert torch.autograd.gradcheck(lambda x: R.ppo_policy_loss(x, old, adv, mask, agg=mode)[0], (logp,))


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_definition(clip):
    torch.manual_seed(6)
    v, old, ret = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.ones(3, 4)
    loss, stats = R.ppo_value_loss(v, old, ret, mask, clip=clip, agg="token-sum")
    if clip is None:
        want = 0.5 * ((v - ret) ** 2).sum()
    else:
        vc = old + torch.clamp(v - old, -clip, clip)
        want = 0.5 * torch.maximum((v - ret) ** 2, (vc - ret) ** 2).sum()
    torch.testing.assert_close(loss, want)
    assert "clip_frac" in stats
    x = v.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: R.ppo_value_loss(a, old.double(), ret.double(), mask, clip=clip)[0], (x,)
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_fused_loss_is_the_unfused_composition(agg):
    torch.manual_seed(7)
    rows, steps, vocab = 3, 5, 17
    logits = torch.randn(rows, steps, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, steps))
    old, ref = torch.randn(rows, steps) - 2, torch.randn(rows, steps) - 2
    adv, mask = torch.randn(rows, steps), torch.rand(rows, steps) > 0.3
    kw = dict(clip_low=0.2, clip_high=0.3, dual_clip=2.5, agg=agg)
    loss, stats = R.fused_ppo_loss(
        logits, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01,
        temperature=0.9, **kw,
    )
    logp, entropy = R.logprobs_and_entropy(logits.reshape(-1, vocab), labels.reshape(-1), temperature=0.9)
    logp, entropy = logp.view(rows, steps), entropy.view(rows, steps)
    want, _ = R.ppo_policy_loss(logp, old, adv, mask, **kw)
    want = want + 0.1 * R.aggregate(R.token_kl(logp, ref, estimator="k2"), mask, agg) - 0.01 * R.aggregate(
        entropy, mask, agg
    )
    torch.testing.assert_close(loss, want)
    assert set(stats) >= {"clip_frac", "approx_kl", "ratio_mean", "kl", "entropy"}
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2)


def test_clip_bounds_pass_the_gradient_on_every_torch_version():
    # exp(log 1.5) and exp(log 0.75) are exact in float32: the ratio sits on the bounds of [0.75, 1.5].
    logp = torch.log(torch.tensor([[1.5, 0.75]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = R.ppo_policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_low=0.25, clip_high=0.5,
                                agg="token-sum")
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, 0.75]]))  # d(-A r)/dlogp = -A r, not 0
