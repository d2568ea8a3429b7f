"""Property tests (hypothesis) for mask handling: what sits under mask == 0 never matters, and the masked ops
agree with their definitions for arbitrary masks, on the reference, the C++ sweep and the Triton kernels."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast import ops
from rlhf_fast.kernels import losses as kernel_losses
from rlhf_fast.reference import AGG_MODES, aggregate


@st.composite
def masked_batch(draw, max_rows=5, max_steps=12):
    rows = draw(st.integers(1, max_rows))
    steps = draw(st.integers(1, max_steps))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(rng.random((rows, steps)) < density)
    return rows, steps, mask, torch.Generator().manual_seed(seed)


def scrambled_under_mask(x, mask, gen):
    """x with every masked position replaced by junk (large values, inf, nan)."""
    junk = torch.randn(x.shape, generator=gen) * 1e4
    junk[::2] = float("nan")
    return torch.where(mask, x, junk.to(x.dtype))


def gae_definition(rewards, values, mask, gamma, lam):
    adv = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in reversed([t for t in range(rewards.shape[1]) if mask[b, t]]):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    return adv, np.where(mask, adv + values, 0.0)


@settings(max_examples=60, deadline=None)
@given(masked_batch(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.sampled_from(["torch", None]))
def test_gae_matches_definition_and_ignores_masked_values(batch, gamma, lam, backend_name):
    rows, steps, mask, gen = batch
    rewards, values = torch.randn(rows, steps, generator=gen), torch.randn(rows, steps, generator=gen)
    with pytest.MonkeyPatch.context() as mp:
        if backend_name:
            mp.setenv("RLHF_FAST_BACKEND", backend_name)
        else:
            mp.delenv("RLHF_FAST_BACKEND", raising=False)  # C++ sweep when built
        adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
        adv2, ret2 = ops.gae(scrambled_under_mask(rewards, mask, gen), scrambled_under_mask(values, mask, gen),
                             mask, gamma=gamma, lam=lam)
    want_adv, want_ret = gae_definition(rewards.double().numpy(), values.double().numpy(), mask.numpy(), gamma, lam)
    np.testing.assert_allclose(adv.numpy(), want_adv, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ret.numpy(), want_ret, atol=1e-4, rtol=1e-4)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


@settings(max_examples=80, deadline=None)
@given(masked_batch(), st.sampled_from(AGG_MODES))
def test_kernel_value_loss_aggregates_like_the_definition_for_any_mask(batch, agg):
    """Every agg mode of the loss kernels (finalize: per-row factors) against ``aggregate`` of the per-token
    definition, for any mask, with the gradient (unclipped value loss: per-token loss 0.5 (v - R)^2)."""
    rows, steps, mask, gen = batch
    values = torch.randn(rows, steps, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    returns = torch.randn(rows, steps, generator=gen)
    loss, _ = kernel_losses.ppo_value_loss(values, values.detach(), returns, mask, clip=None, agg=agg)
    v64 = values.detach().double().requires_grad_(True)
    want = aggregate(0.5 * (v64 - returns.double()) ** 2, mask, agg)
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, values)
    (want_grad,) = torch.autograd.grad(want, v64)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(masked_batch(), st.sampled_from(AGG_MODES), st.sampled_from(["torch", "triton"]))
def test_policy_and_value_losses_ignore_what_is_under_the_mask(batch, agg, backend_name):
    rows, steps, mask, gen = batch
    logp = torch.randn(rows, steps, generator=gen) * 0.3 - 1
    old = logp + torch.randn(rows, steps, generator=gen) * 0.2
    adv = torch.randn(rows, steps, generator=gen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_FAST_BACKEND", backend_name)
        results = []
        for scramble in (False, True):
            x = (scrambled_under_mask(logp, mask, gen) if scramble else logp).detach().clone().requires_grad_()
            o = scrambled_under_mask(old, mask, gen) if scramble else old
            a = scrambled_under_mask(adv, mask, gen) if scramble else adv
            loss, stats = ops.ppo_policy_loss(x, o, a, mask, agg=agg, dual_clip=3.0)
            loss.backward()
            v = x.detach().clone().requires_grad_()
            vloss, _ = ops.ppo_value_loss(v, o, a, mask, agg=agg)
            vloss.backward()
            results.append((loss, stats, torch.where(mask, x.grad, 0.0), vloss, torch.where(mask, v.grad, 0.0)))
    (loss, stats, grad, vloss, vgrad), (loss2, stats2, grad2, vloss2, vgrad2) = results
    assert torch.isfinite(loss) and torch.isfinite(vloss)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vloss2, vloss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad2, grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vgrad2, vgrad, atol=1e-6, rtol=1e-6)
    for key in stats:
        torch.testing.assert_close(stats2[key], stats[key], atol=1e-6, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(masked_batch(), st.booleans())
def test_masked_whiten_matches_definition_for_any_mask(batch, shift_mean):
    rows, steps, mask, gen = batch
    x = torch.randn(rows, steps, generator=gen) * 2 + 1
    got = ops.masked_whiten(scrambled_under_mask(x, mask, gen), mask, shift_mean=shift_mean)
    selected = x[mask].double()
    if selected.numel() == 0:
        assert torch.equal(got, torch.zeros_like(x))
        return
    mean = selected.mean()
    var = selected.var(unbiased=True) if selected.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    want = (x.double() - mean) * torch.rsqrt(var + 1e-8) + (0 if shift_mean else mean)
    torch.testing.assert_close(got.double(), torch.where(mask, want, 0.0), atol=1e-4, rtol=1e-4)
