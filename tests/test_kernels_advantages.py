"""Triton GAE and masked_whiten against the reference, through rlhf_fast.ops with ``backend("triton")``.

On CPU the kernels run under TRITON_INTERPRET=1, where the GAE scan tile is 64 tokens (the interpreter runs a scan
element by element), so rows of a few hundred tokens already cross several tiles; tests also force smaller tiles.
The GPU tests (marked ``gpu``) use the real 1024-token tile, bf16 and realistic sizes.
"""
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast import reference as ref
from rlhf_fast.kernels import advantages as kadv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_backend(backend):
    backend("triton")


def _gae_inputs(rows, steps, *, dtype=torch.float32, seed=0, mask_kind="holes"):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, steps, generator=g)
    values = torch.randn(rows, steps, generator=g)
    mask = torch.rand(rows, steps, generator=g) > 0.3
    if rows > 2 and steps > 4:
        mask[1] = False  # fully masked row
        mask[2, :3] = False  # prompt-like prefix
        mask[2, -2:] = False  # padding-like suffix
    if mask_kind == "int":
        mask = mask.long()
    elif mask_kind == "float":
        mask = mask.float()
    return rewards.to(dtype).to(DEVICE), values.to(dtype).to(DEVICE), mask.to(DEVICE)


def _gae_tol(adv_ref, steps):
    # The scan associates the recursion differently from the sequential loop: float32 rounding that grows with
    # the number of terms and their size.
    scale = max(1.0, adv_ref.abs().max().item())
    return dict(atol=2e-6 * scale * max(1.0, steps / 256) ** 0.5, rtol=1e-5)


def _check_gae(rewards, values, mask, gamma, lam, **kw):
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, **kw)
    adv_ref, ret_ref = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == rewards.shape
    tol = _gae_tol(adv_ref, rewards.shape[1])
    torch.testing.assert_close(adv, adv_ref, **tol)
    torch.testing.assert_close(ret, ret_ref, **tol)
    valid = mask.bool()
    assert not adv[~valid].any() and not ret[~valid].any()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.0, 0.5), (0.7, 0.0)])
@pytest.mark.parametrize("shape", [(4, 37), (3, 1), (4, 150)])
def test_gae_matches_reference(shape, gamma, lam):
    _check_gae(*_gae_inputs(*shape, seed=shape[1]), gamma, lam)


@pytest.mark.parametrize("chunk", [16, 32])
def test_gae_chunk_carries(monkeypatch, chunk):
    # Many tiles per row, T not a multiple of the tile, masked runs that cross tile boundaries.
    rewards, values, mask = _gae_inputs(4, 5 * chunk + 3, seed=chunk)
    mask[0, chunk - 5: 2 * chunk + 4] = False
    monkeypatch.setattr(kadv, "GAE_CHUNK_INTERPRETED", chunk)
    monkeypatch.setattr(kadv, "GAE_CHUNK", chunk)
    _check_gae(rewards, values, mask, 0.99, 0.95)


def test_gae_skips_masked_tokens_instead_of_zeroing():
    # A hole must not reset the recursion: the token before it sees the value and advantage after it.
    rewards = torch.tensor([[1.0, 5.0, 2.0]], device=DEVICE)
    values = torch.tensor([[0.5, 9.0, 0.25]], device=DEVICE)
    mask = torch.tensor([[1, 0, 1]], device=DEVICE)
    adv, ret = ops.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    a2 = 2.0 - 0.25
    a0 = 1.0 + 0.5 * 0.25 - 0.5 + 0.25 * a2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2]], device=DEVICE))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25]], device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gae_low_precision_inputs(dtype):
    # The reference upcasts the same rounded inputs, so the float32 tolerance still applies.
    _check_gae(*_gae_inputs(3, 70, dtype=dtype, seed=3), 1.0, 0.95)


@pytest.mark.parametrize("mask_kind", ["int", "float"])
def test_gae_mask_dtypes_and_strides(mask_kind):
    rewards, values, mask = _gae_inputs(3, 45, seed=4, mask_kind=mask_kind)
    _check_gae(rewards, values, mask, 0.95, 0.9)
    # Transposed storage: the kernel reads through strides.
    views = tuple(t.t().contiguous().t() for t in (rewards, values, mask))
    assert not views[0].is_contiguous()
    _check_gae(*views, 0.95, 0.9)


def test_gae_long_rows():
    rewards, values, mask = _gae_inputs(1, 5000, seed=5)
    _check_gae(rewards, values, mask, 1.0, 0.95)


def test_gae_rows_are_batch_and_padding_invariant():
    rewards, values, mask = _gae_inputs(5, 140, seed=6)
    full = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    again = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    for lo, hi in [(0, 1), (3, 5)]:
        part = ops.gae(rewards[lo:hi], values[lo:hi], mask[lo:hi], gamma=0.99, lam=0.95)
        assert all(torch.equal(a[lo:hi], b) for a, b in zip(full, part))
    # Right padding (masked tokens after the row) changes nothing, bitwise.
    pad = lambda t, v: torch.cat([t, torch.full((5, 77), v, dtype=t.dtype, device=DEVICE)], 1)  # noqa: E731
    padded = ops.gae(pad(rewards, 3.0), pad(values, -2.0), pad(mask, False), gamma=0.99, lam=0.95)
    assert all(torch.equal(a, b[:, :140]) for a, b in zip(full, padded))


def test_gae_empty_inputs():
    adv, ret = ops.gae(torch.zeros(0, 5, device=DEVICE), torch.zeros(0, 5, device=DEVICE),
                       torch.zeros(0, 5, device=DEVICE))
    assert adv.shape == ret.shape == (0, 5)


# ---- masked_whiten -------------------------------------------------------------------------------------------


def _whiten_inputs(shape, *, dtype=torch.float32, seed=0, p_valid=0.6):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3.0 + 1.5).to(dtype).to(DEVICE)
    mask = (torch.rand(shape, generator=g) < p_valid).to(DEVICE)
    return x, mask


def _check_whiten(x, mask, tol, **kw):
    y = ops.masked_whiten(x, mask, **kw)
    y_ref = ref.masked_whiten(x, mask, **kw)
    assert y.dtype == torch.float32 and y.shape == x.shape
    atol, rtol = tol
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    return y


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(1,), (4, 37), (2, 3, 50)])
def test_whiten_matches_reference(tol, shape, shift_mean):
    _check_whiten(*_whiten_inputs(shape, seed=len(shape)), tol(torch.float32), shift_mean=shift_mean)


def test_whiten_many_blocks_fixed_order(monkeypatch, tol):
    # Small blocks: 40 partials merged over several finalize iterations.
    monkeypatch.setattr(kadv, "WHITEN_BLOCK", 64)
    monkeypatch.setattr(kadv, "WHITEN_FINAL_BLOCK", 16)
    x, mask = _whiten_inputs((10, 250), seed=3)
    mask[:3] = False  # whole blocks without a valid position
    first = _check_whiten(x, mask, tol(torch.float32), shift_mean=False)
    assert torch.equal(first, ops.masked_whiten(x, mask, shift_mean=False))


@pytest.mark.parametrize("valid", [0, 1])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_fewer_than_two_valid(tol, valid, shift_mean):
    x, _ = _whiten_inputs((3, 20), seed=4)
    mask = torch.zeros(3, 20, dtype=torch.bool, device=DEVICE)
    mask.view(-1)[:valid] = True
    _check_whiten(x, mask, tol(torch.float32), shift_mean=shift_mean)
    _check_whiten(x, mask.float(), tol(torch.float32), shift_mean=shift_mean, eps=1e-5)


def test_whiten_fp16_and_int_mask(tol):
    x, mask = _whiten_inputs((5, 40), dtype=torch.float16, seed=5)
    _check_whiten(x, mask.long(), tol(torch.float16))


def test_whiten_autograd_falls_back_to_reference(backend):
    x, mask = _whiten_inputs((4, 30), seed=6)
    upstream = torch.randn(4, 30, device=DEVICE)
    grads = []
    for name in ("triton", "torch"):
        backend(name)
        leaf = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ops.masked_whiten(leaf, mask), leaf, upstream)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])


# ---- GPU: bf16, realistic sizes, the real 1024-token tile ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 1024), (64, 4096), (4, 32768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gae_realistic(shape, dtype):
    rewards, values, mask = _gae_inputs(*shape, dtype=dtype, seed=7)
    if shape[1] > 4096:
        ref_fn = ref.gae  # the loop is slow on the GPU: compare on CPU
        adv, ret = ops.gae(rewards, values, mask, gamma=1.0, lam=0.95)
        adv_ref, ret_ref = ref_fn(rewards.cpu(), values.cpu(), mask.cpu(), gamma=1.0, lam=0.95)
        tol = _gae_tol(adv_ref, shape[1])
        torch.testing.assert_close(adv.cpu(), adv_ref, **tol)
        torch.testing.assert_close(ret.cpu(), ret_ref, **tol)
    else:
        _check_gae(rewards, values, mask, 1.0, 0.95)
        _check_gae(rewards, values, mask, 0.99, 0.9)


@pytest.mark.gpu
def test_gpu_gae_batch_and_padding_invariant():
    rewards, values, mask = _gae_inputs(64, 3000, dtype=torch.bfloat16, seed=8)
    full = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    part = ops.gae(rewards[7:9], values[7:9], mask[7:9], gamma=0.99, lam=0.95)
    assert all(torch.equal(a[7:9], b) for a, b in zip(full, part))
    pad = lambda t: torch.nn.functional.pad(t, (0, 1500))  # noqa: E731
    padded = ops.gae(pad(rewards), pad(values), pad(mask), gamma=0.99, lam=0.95)
    assert all(torch.equal(a, b[:, :3000]) for a, b in zip(full, padded))


@pytest.mark.gpu
def test_gpu_whiten_realistic(tol):
    x, mask = _whiten_inputs((256, 4096), dtype=torch.bfloat16, seed=9)
    first = _check_whiten(x, mask, tol(torch.float32))  # fp32 math on the same bf16 values on both sides
    assert torch.equal(first, ops.masked_whiten(x, mask))
    _check_whiten(x.float(), mask, tol(torch.float32), shift_mean=False)
