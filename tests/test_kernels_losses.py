"""Triton PPO policy / value losses and token_kl against the reference, forward and backward, through rlhf_fast.ops.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest). Every case runs the same inputs through
``backend("torch")`` (the reference) and ``backend("triton")`` and compares loss, statistics and the gradient for a
random upstream gradient. bf16 and realistic sizes run only on the GPU (marked ``gpu``).
"""
import pytest
import torch
from _host_work import ALLOCATIONS, RecordAten

from rlhf_fast import ops
from rlhf_fast.reference.losses import AGG_MODES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mask(rows, steps, gen, *, empty_row=True):
    m = torch.rand(rows, steps, generator=gen) > 0.3  # holes everywhere
    if empty_row and rows > 1:
        m[1] = False  # a fully masked row
    return m


def _policy_inputs(rows=4, steps=37, dtype=torch.float32, seed=0, per_seq=False, isw=False):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(rows, steps, generator=g) * 0.5 - 1.0
    logp = old + torch.randn(rows, steps, generator=g) * 0.3  # ratios spread on both sides of the clip range
    adv = torch.randn(rows, generator=g) if per_seq else torch.randn(rows, steps, generator=g)
    mask = _mask(rows, steps, g)
    weights = torch.rand(rows, steps, generator=g) * 1.5 if isw else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(logp), cast(old), cast(adv), mask.to(DEVICE), cast(weights)


def _run_policy(backend, name, logp, old, adv, mask, upstream, **kw):
    backend(name)
    x = logp.detach().clone().requires_grad_(True)
    loss, stats = ops.ppo_policy_loss(x, old, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss, stats, grad


def _grad_tol(tol, grad_rtol, ref_grad):
    """(atol, rtol) for a gradient: ``tol``, or with ``grad_rtol`` a tolerance relative to the largest entry (a
    bf16 gradient against the fp32 reference differs by its rounding; an absolute bf16 tolerance would pass
    all-zero gradients of this size)."""
    if grad_rtol is None:
        return tol
    return 1e-3 * ref_grad.float().abs().max().item(), grad_rtol


def _compare_policy(backend, inputs, tol, grad_rtol=None, **kw):
    logp, old, adv, mask, isw = inputs
    upstream = torch.tensor(1.7, device=DEVICE)
    ref = _run_policy(backend, "torch", logp, old, adv, mask, upstream, is_weights=isw, **kw)
    out = _run_policy(backend, "triton", logp, old, adv, mask, upstream, is_weights=isw, **kw)
    atol, rtol = tol
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    torch.testing.assert_close(out[0], ref[0], atol=atol, rtol=rtol)
    assert set(out[1]) == set(ref[1])
    for key in ref[1]:
        assert out[1][key].dtype == torch.float32 and out[1][key].dim() == 0
        torch.testing.assert_close(out[1][key], ref[1][key], atol=atol, rtol=rtol, msg=key)
    assert out[2].dtype == logp.dtype and out[2].shape == logp.shape
    atol, rtol = _grad_tol(tol, grad_rtol, ref[2])
    torch.testing.assert_close(out[2].float(), ref[2].float(), atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [(0.2, None, None), (0.2, 0.28, 3.0), (0.1, 0.4, 1.5)])
def test_policy_loss_every_agg_and_clip(backend, tol, agg, clip):
    clip_low, clip_high, dual = clip
    out = _compare_policy(
        backend, _policy_inputs(seed=len(agg)), tol(torch.float32),
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg=agg,
    )
    assert ("dual_clip_frac" in out[1]) == (dual is not None)


def test_policy_loss_stats_are_nontrivial(backend, tol):
    # The inputs must exercise every branch, or the comparisons above prove little.
    logp, old, adv, mask, _ = _policy_inputs(seed=3)
    backend("triton")
    _, stats = ops.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, dual_clip=1.5)
    assert 0.05 < stats["clip_frac"].item() < 0.95
    assert stats["dual_clip_frac"].item() > 0.0


@pytest.mark.parametrize("per_seq,isw", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_per_sequence_advantages_and_is_weights(backend, tol, per_seq, isw, agg):
    _compare_policy(
        backend, _policy_inputs(rows=5, steps=19, per_seq=per_seq, isw=isw, seed=7), tol(torch.float32),
        clip_low=0.2, clip_high=0.3, dual_clip=2.0, agg=agg,
    )


@pytest.mark.parametrize(
    "agg,counts",
    [
        ("token-mean", dict(num_tokens=211)),
        ("token-mean", dict(num_tokens=torch.tensor(95.0))),
        ("seq-mean-token-sum", dict(num_seqs=11)),
        ("seq-mean-token-mean", dict(num_seqs=torch.tensor(6))),
        ("seq-mean-token-sum-norm", dict(num_seqs=3, loss_scale=512)),
    ],
)
def test_policy_loss_count_overrides(backend, tol, agg, counts):
    counts = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in counts.items()}
    _compare_policy(backend, _policy_inputs(seed=11), tol(torch.float32), agg=agg, **counts)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 1500), (2, 1025)])
def test_policy_loss_odd_shapes(backend, tol, shape):
    # T = 1; one long row over two tiles, the last partial; T one past a tile.
    _compare_policy(backend, _policy_inputs(*shape, seed=5), tol(torch.float32), clip_low=0.2, dual_clip=3.0)


def test_policy_loss_flat_tokens_and_strided_inputs(backend, tol):
    logp, old, adv, mask, isw = _policy_inputs(rows=3, steps=50, isw=True, seed=2)
    flat = [t.reshape(-1) for t in (logp, old, adv, mask, isw)]
    _compare_policy(backend, tuple(flat), tol(torch.float32), agg="seq-mean-token-mean")
    # Transposed (non-contiguous) views: the kernel reads through strides.
    views = tuple(t.t().contiguous().t() for t in (logp, old, adv, mask, isw))
    assert not views[0].is_contiguous()
    _compare_policy(backend, views, tol(torch.float32), agg="token-mean", dual_clip=2.0)


def test_policy_loss_ties_take_autograd_subgradients(backend, tol):
    # ratio == 1 (inside the range: both branches equal, torch.maximum splits the gradient), A == 0 (every
    # branch equal) and logp far from old_logp with A == 0.
    logp, old, adv, mask, _ = _policy_inputs(rows=3, steps=40, seed=9)
    old = old.clone()
    old[0] = logp[0]
    adv = adv.clone()
    adv[1] = 0.0
    adv[2, ::2] = 0.0
    _compare_policy(backend, (logp, old, adv, mask, None), tol(torch.float32), clip_low=0.2, dual_clip=2.0)


def test_policy_loss_ratio_exactly_on_the_clip_bounds(backend, tol):
    # exp(log_ratio) is exactly 1.5 and 0.75 in float32 (torch and numpy agree for these log ratios): the two
    # branches tie and torch.clamp's closed interval passes the gradient; an open interval would halve it.
    import math

    log_ratio = torch.tensor([math.log(1.5), math.log(0.75)], dtype=torch.float32).repeat(2, 8)
    assert set(torch.exp(log_ratio).unique().tolist()) == {1.5, 0.75}
    adv = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.bool)
    inputs = tuple(t.to(DEVICE) for t in (log_ratio, torch.zeros(2, 16), adv, mask)) + (None,)
    out = _compare_policy(backend, inputs, tol(torch.float32), clip_low=0.25, clip_high=0.5)
    assert out[2].abs().min() > 0  # every token passes its gradient


def test_policy_loss_empty_batch_is_zero(backend):
    logp, old, adv, mask, _ = _policy_inputs(rows=3, steps=9)
    mask = torch.zeros_like(mask)
    for agg in AGG_MODES:
        loss, stats, grad = _run_policy(backend, "triton", logp, old, adv, mask, torch.tensor(1.0), agg=agg)
        assert loss.item() == 0.0 and not grad.any()
        assert all(v.item() == 0.0 for v in stats.values())


def test_losses_on_empty_tensors(backend):
    # Called on the kernels directly: rlhf_fast.ops cannot fold a [3, 0] tensor into rows (reshape(-1, 0)).
    from rlhf_fast.kernels import losses as kl

    for shape in [(0, 5), (3, 0)]:
        x = torch.zeros(shape, device=DEVICE, requires_grad=True)
        mask = torch.ones(shape, dtype=torch.bool, device=DEVICE)
        loss, stats = kl.ppo_policy_loss(x, x.detach(), x.detach(), mask)
        vloss, vstats = kl.ppo_value_loss(x, x.detach(), x.detach(), mask)
        (grad,) = torch.autograd.grad(loss + vloss, x)
        assert loss.item() == 0.0 and vloss.item() == 0.0 and grad.shape == shape
        assert all(v.item() == 0.0 for v in (*stats.values(), *vstats.values()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_policy_loss_masked_garbage_does_not_leak(backend):
    logp, old, adv, mask, _ = _policy_inputs(rows=3, steps=9)
    logp = torch.where(mask, logp, torch.full_like(logp, float("inf")))
    loss, stats, grad = _run_policy(backend, "triton", logp, old, adv, mask, torch.tensor(1.0))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_policy_loss_fp16_loose(backend, tol):
    _compare_policy(
        backend, _policy_inputs(rows=4, steps=33, dtype=torch.float16, isw=True, seed=4), tol(torch.float16),
        clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-sum",
    )


def test_policy_loss_no_grad_and_bitwise_repeatable(backend):
    logp, old, adv, mask, isw = _policy_inputs(rows=6, steps=45, isw=True, seed=13)
    backend("triton")
    with torch.no_grad():
        first = ops.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0, is_weights=isw)
    second = ops.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0, is_weights=isw)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_policy_loss_gradient_rows_batch_invariant(backend):
    # With token-sum the weights do not depend on the batch, so each row's gradient must be bitwise the same
    # alone as in the batch.
    logp, old, adv, mask, isw = _policy_inputs(rows=6, steps=45, isw=True, seed=17)
    upstream = torch.tensor(0.3, device=DEVICE)
    full = _run_policy(backend, "triton", logp, old, adv, mask, upstream, agg="token-sum", dual_clip=2.0,
                       is_weights=isw)[2]
    for lo, hi in [(0, 1), (2, 3), (3, 6)]:
        part = _run_policy(backend, "triton", logp[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi], upstream,
                           agg="token-sum", dual_clip=2.0, is_weights=isw[lo:hi])[2]
        assert torch.equal(full[lo:hi], part)


# ---- value loss ---------------------------------------------------------------------------------------------


def _value_inputs(rows=4, steps=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(rows, steps, generator=g)
    values = old + torch.randn(rows, steps, generator=g) * 0.3
    returns = torch.randn(rows, steps, generator=g)
    mask = _mask(rows, steps, g)
    return tuple(t.to(dtype).to(DEVICE) for t in (values, old, returns)) + (mask.to(DEVICE),)


def _run_value(backend, name, values, old, returns, mask, upstream, **kw):
    backend(name)
    x = values.detach().clone().requires_grad_(True)
    loss, stats = ops.ppo_value_loss(x, old, returns, mask, **kw)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss, stats, grad


def _compare_value(backend, inputs, tol, grad_rtol=None, **kw):
    upstream = torch.tensor(-0.6, device=DEVICE)
    ref = _run_value(backend, "torch", *inputs, upstream, **kw)
    out = _run_value(backend, "triton", *inputs, upstream, **kw)
    atol, rtol = tol
    torch.testing.assert_close(out[0], ref[0], atol=atol, rtol=rtol)
    assert set(out[1]) == set(ref[1])
    for key in ref[1]:
        torch.testing.assert_close(out[1][key], ref[1][key], atol=atol, rtol=rtol, msg=key)
    assert out[2].dtype == inputs[0].dtype
    atol, rtol = _grad_tol(tol, grad_rtol, ref[2])
    torch.testing.assert_close(out[2].float(), ref[2].float(), atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [0.2, 0.05, None])
def test_value_loss_every_agg_and_clip(backend, tol, agg, clip):
    out = _compare_value(backend, _value_inputs(seed=len(agg)), tol(torch.float32), clip=clip, agg=agg)
    if clip == 0.05:
        assert out[1]["clip_frac"].item() > 0.0


@pytest.mark.parametrize("shape", [(1, 1), (2, 1030)])
def test_value_loss_odd_shapes_and_overrides(backend, tol, shape):
    _compare_value(backend, _value_inputs(*shape, seed=3), tol(torch.float32), clip=0.1)
    _compare_value(backend, _value_inputs(*shape, seed=4), tol(torch.float32), clip=0.1, agg="seq-mean-token-mean",
                   num_seqs=5)


def test_value_loss_ties_and_fp16(backend, tol):
    values, old, returns, mask = _value_inputs(rows=3, steps=20, seed=8)
    old = old.clone()
    old[0] = values[0]  # v == old: clipped and unclipped equal, gradient split by torch.maximum
    returns = returns.clone()
    returns[1] = values[1]  # zero error
    _compare_value(backend, (values, old, returns, mask), tol(torch.float32), clip=0.2)
    # v - old exactly on +-clip: torch.clamp passes the gradient there.
    steps = torch.tensor([0.25, -0.25]).repeat(2, 4)
    ret = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    edge = tuple(t.to(DEVICE) for t in (steps, torch.zeros(2, 8), ret, torch.ones(2, 8)))
    _compare_value(backend, edge, tol(torch.float32), clip=0.25)
    _compare_value(backend, _value_inputs(rows=3, steps=40, dtype=torch.float16, seed=6), tol(torch.float16),
                   clip=0.2, agg="token-sum")


# ---- token_kl ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (3, 5, 7)), (torch.float32, (1,)), (torch.float16, (2, 1100))])
def test_token_kl_forward_backward(backend, tol, estimator, dtype, shape):
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(shape, generator=g) - 1.0).to(dtype).to(DEVICE)
    ref_logp = (logp.float() + torch.randn(shape, generator=g) * 0.5).to(dtype).to(DEVICE)
    upstream = torch.randn(shape, generator=g).to(DEVICE)
    results = []
    for name in ("torch", "triton"):
        backend(name)
        x = logp.detach().clone().requires_grad_(True)
        r = ref_logp.detach().clone().requires_grad_(True)
        kl = ops.token_kl(x, r, estimator=estimator)
        results.append((kl,) + torch.autograd.grad(kl, (x, r), upstream))
    ref, out = results
    assert out[0].dtype == torch.float32 and out[0].shape == logp.shape
    atol, rtol = tol(dtype)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ---- differentiable inputs only; first order only ----------------------------------------------------------------


def test_policy_loss_grad_only_through_logp(backend, tol):
    """old_logp / advantages / is_weights / a float mask that require grad are constants: no crash, no grads."""
    logp, old, adv, mask, isw = _policy_inputs(rows=3, steps=20, isw=True, seed=21)
    backend("triton")
    consts = [t.detach().clone().requires_grad_(True) for t in (old, adv, mask.float(), isw)]
    o, a, m, w = consts
    loss, stats = ops.ppo_policy_loss(logp, o, a, m, is_weights=w, dual_clip=2.0)  # logp needs no grad
    if loss.requires_grad:  # a loss that requires grad must at least backward without crashing
        loss.backward()
    assert not loss.requires_grad
    x = logp.detach().clone().requires_grad_(True)
    loss, _ = ops.ppo_policy_loss(x, o, a, m, is_weights=w, dual_clip=2.0)
    grads = torch.autograd.grad(1.3 * loss, [x, *consts], allow_unused=True)
    assert all(g is None for g in grads[1:])
    want = _run_policy(backend, "triton", logp, old, adv, mask, 1.3, is_weights=isw, dual_clip=2.0)[2]
    torch.testing.assert_close(grads[0], want, atol=tol(torch.float32)[0], rtol=tol(torch.float32)[1])


def test_value_loss_grad_only_through_values(backend, tol):
    values, old, returns, mask = _value_inputs(rows=3, steps=20, seed=22)
    backend("triton")
    consts = [t.detach().clone().requires_grad_(True) for t in (old, returns, mask.float())]
    loss, _ = ops.ppo_value_loss(values, *consts, clip=0.1)
    if loss.requires_grad:
        loss.backward()
    assert not loss.requires_grad
    x = values.detach().clone().requires_grad_(True)
    loss, _ = ops.ppo_value_loss(x, *consts, clip=0.1)
    grads = torch.autograd.grad(0.4 * loss, [x, *consts], allow_unused=True)
    assert all(g is None for g in grads[1:])
    want = _run_value(backend, "triton", values, old, returns, mask, 0.4, clip=0.1)[2]
    torch.testing.assert_close(grads[0], want, atol=tol(torch.float32)[0], rtol=tol(torch.float32)[1])


def test_double_backward_raises(backend):
    """The Triton backwards are first order: create_graph=True is an error, never first-order grads."""
    logp, old, adv, mask, _ = _policy_inputs(rows=2, steps=9, seed=23)
    values, v_old, returns, v_mask = _value_inputs(rows=2, steps=9, seed=24)
    backend("triton")
    x = logp.detach().clone().requires_grad_(True)
    loss, _ = ops.ppo_policy_loss(x, old, adv, mask)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    v = values.detach().clone().requires_grad_(True)
    loss, _ = ops.ppo_value_loss(v, v_old, returns, v_mask)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, v, create_graph=True)
    r = old.detach().clone().requires_grad_(True)
    kl = ops.token_kl(x, r)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(kl.sum(), (x, r), create_graph=True)
    (g,) = torch.autograd.grad(ops.ppo_policy_loss(x, old, adv, mask)[0], x)  # first order still works
    assert g.shape == x.shape and not g.requires_grad


# ---- host work: three Triton launches and no other device work --------------------------------------------------




@pytest.mark.parametrize("which", ["policy", "value"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("override", [None, "number", "tensor"])
def test_losses_forward_backward_are_three_launches_and_no_aten_compute(backend, count_launches, which, agg, override):
    launches, state = count_launches
    backend("triton")
    if which == "policy":
        logp, old, adv, mask, isw = _policy_inputs(rows=5, steps=37, per_seq=True, isw=True, seed=31)
        op = lambda x, **kw: ops.ppo_policy_loss(x, old, adv, mask, is_weights=isw, dual_clip=2.0, **kw)  # noqa: E731
    else:
        logp, old, adv, mask = _value_inputs(rows=5, steps=37, seed=32)
        op = lambda x, **kw: ops.ppo_value_loss(x, old, adv, mask, clip=0.2, **kw)  # noqa: E731
    name = "num_tokens" if agg == "token-mean" else "num_seqs"
    counts = {} if override is None else {name: 7 if override == "number" else torch.tensor(7.0, device=DEVICE)}
    x = logp.detach().clone().requires_grad_(True)
    upstream = torch.tensor(0.7, device=DEVICE)
    launches.clear()
    with RecordAten() as rec:
        state["record"] = rec
        loss, stats = op(x, agg=agg, **counts)
        (grad,) = torch.autograd.grad(loss, x, upstream)
    state["record"] = None
    compute = [str(f) for f in rec.ops if not f.is_view and str(f) not in ALLOCATIONS]
    # The one device read left is validation's of a tensor override (it must be checked positive and finite).
    expected = ["aten._local_scalar_dense.default"] if override == "tensor" else []
    assert compute == expected, compute
    assert len(launches) == 3, launches  # forward, finalize, backward
    # And the numbers are still the reference's.
    backend("torch")
    y = logp.detach().clone().requires_grad_(True)
    ref_loss, ref_stats = op(y, agg=agg, **counts)
    (ref_grad,) = torch.autograd.grad(ref_loss, y, upstream)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], atol=1e-5, rtol=1e-5)


# ---- GPU: bf16 and realistic sizes ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_losses_realistic(backend, tol, dtype):
    # Both sides do fp32 math on the same bf16 values: the loss and stats get the fp32 tolerance; the bf16
    # gradient gets a rounding-sized tolerance relative to its largest entry.
    fwd_tol, grad_rtol = tol(torch.float32), (1e-2 if dtype == torch.bfloat16 else None)
    inputs = _policy_inputs(rows=64, steps=2048, dtype=dtype, isw=True, seed=21)
    for agg in AGG_MODES:
        _compare_policy(backend, inputs, fwd_tol, grad_rtol, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg)
    per_seq = _policy_inputs(rows=64, steps=2048, dtype=dtype, per_seq=True, seed=22)
    _compare_policy(backend, per_seq, fwd_tol, grad_rtol)
    _compare_value(backend, _value_inputs(rows=64, steps=2048, dtype=dtype, seed=23), fwd_tol, grad_rtol, clip=0.2)


@pytest.mark.gpu
def test_gpu_policy_loss_batch_invariant_bf16(backend):
    logp, old, adv, mask, isw = _policy_inputs(rows=32, steps=3000, dtype=torch.bfloat16, isw=True, seed=24)
    upstream = torch.tensor(1.0, device=DEVICE)
    kw = dict(agg="token-sum", dual_clip=3.0)
    full = _run_policy(backend, "triton", logp, old, adv, mask, upstream, is_weights=isw, **kw)
    again = _run_policy(backend, "triton", logp, old, adv, mask, upstream, is_weights=isw, **kw)
    assert torch.equal(full[0], again[0]) and torch.equal(full[2], again[2])
    part = _run_policy(backend, "triton", logp[5:6], old[5:6], adv[5:6], mask[5:6], upstream, is_weights=isw[5:6], **kw)
    assert torch.equal(full[2][5:6], part[2])


def test_loss_is_its_own_tensor_not_a_view(backend):
    """The loss can be changed in place (``loss /= accumulation_steps``) on both backends: the kernels return it
    as a tensor of its own, not a view of a buffer it shares with the statistics."""
    logp, old, adv, mask, _ = _policy_inputs(seed=41)
    values, v_old, returns, v_mask = _value_inputs(seed=42)
    grads = {}
    for name in ("torch", "triton"):
        backend(name)
        x, v = logp.detach().clone().requires_grad_(True), values.detach().clone().requires_grad_(True)
        loss, stats = ops.ppo_policy_loss(x, old, adv, mask)
        v_loss, _ = ops.ppo_value_loss(v, v_old, returns, v_mask)
        loss /= 4
        v_loss *= 0.5
        stats["clip_frac"] *= 100  # non-differentiable statistics too
        (loss + v_loss).backward()
        grads[name] = (x.grad, v.grad)
    for ours, ref in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_no_gradient_buffer_without_grad_mode(backend, count_launches):
    """Under no_grad a logp that requires grad gets no [R, T] gradient-factor buffer (autograd still says the
    input needs a gradient there)."""
    _, state = count_launches
    backend("triton")
    logp, old, adv, mask, _ = _policy_inputs(rows=3, steps=29, seed=43)
    x = logp.detach().clone().requires_grad_(True)
    for grad_mode, expect_buffer in ((torch.no_grad, False), (torch.enable_grad, True)):
        with grad_mode(), RecordAten() as rec:
            state["record"] = rec
            ops.ppo_policy_loss(x, old, adv, mask)
        state["record"] = None
        shapes = [tuple(args[0]) for func, args in rec.calls if str(func) in ALLOCATIONS]
        assert ((3, 29) in shapes) == expect_buffer, shapes
