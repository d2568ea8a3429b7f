"""Reference GAE and masked whitening against straightforward definitions, plus the C++ sweep."""
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast import reference as R
from rlhf_fast._dispatch import native_module


def gae_definition(rewards, values, mask, gamma, lam):
    """Per row: walk the valid indices only, exactly as API.md states."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value = next_adv = 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            next_value = float(values[b, t])
            adv[b, t] = next_adv
    returns = torch.where(mask.bool(), adv + values.double(), 0.0)
    return adv, returns


def test_gae_hand_worked_with_a_hole():
    # One row, token 1 is an observation (masked): it is skipped, not zeroed.
    rewards = torch.tensor([[0.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 2.0]])
    mask = torch.tensor([[1, 0, 1]])
    adv, ret = R.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    a2 = 1.0 - 2.0  # last valid token: delta = r - V
    a0 = (0.0 + 0.5 * 2.0 - 0.5) + 0.25 * a2  # next valid token of t=0 is t=2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 2.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.0, 0.5)])
def test_gae_matches_definition_with_holes_and_empty_rows(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 17), torch.randn(5, 17)
    mask = torch.rand(5, 17) > 0.35
    mask[2] = False  # fully masked row
    want_adv, want_ret = gae_definition(rewards, values, mask, gamma, lam)
    adv, ret = R.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv.double(), want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), want_ret, atol=1e-5, rtol=1e-5)
    assert (adv[2] == 0).all() and (ret[2] == 0).all()


@pytest.mark.skipif(native_module() is None, reason="rlhf_fast._C was not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_gae_matches_reference(dtype, monkeypatch):
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    torch.manual_seed(1)
    rewards, values = torch.randn(9, 300).to(dtype), torch.randn(9, 300).to(dtype)
    mask = (torch.rand(9, 300) > 0.2).int()
    mask[4] = 0
    native = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    reference = R.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    for a, b in zip(native, reference):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gae_rows_are_independent_bitwise():
    torch.manual_seed(2)
    rewards, values = torch.randn(6, 40), torch.randn(6, 40)
    mask = torch.rand(6, 40) > 0.3
    full = ops.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    alone = ops.gae(rewards[3:4], values[3:4], mask[3:4], gamma=0.97, lam=0.9)
    for a, b in zip(full, alone):
        assert torch.equal(a[3:4], b)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_definition(shift_mean):
    torch.manual_seed(3)
    x = torch.randn(4, 11) * 3 + 2
    mask = torch.rand(4, 11) > 0.4
    selected = x[mask].double()
    mean, var = selected.mean(), selected.var(unbiased=True)
    want = (x.double() - mean) / torch.sqrt(var + 1e-8)
    if not shift_mean:
        want = want + mean
    want = torch.where(mask, want, 0.0)
    got = R.masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got[~mask] == 0).all()


def test_masked_whiten_degenerate_masks():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(R.masked_whiten(x, torch.zeros(1, 3)), torch.zeros(1, 3))
    one = R.masked_whiten(x, torch.tensor([[0, 1, 0]]))
    assert torch.isfinite(one).all() and torch.equal(one, torch.zeros(1, 3))


def test_masked_whiten_gradient_float64():
    torch.manual_seed(4)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    assert torch.autograd.gradcheck(lambda a: R.masked_whiten(a, mask), (x,))
