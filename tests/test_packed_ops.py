"""Ops on packed rows with ``cu_seqlens`` equal the same ops on the padded batch, for every aggregation mode,
on the reference and on the Triton kernels (under TRITON_INTERPRET=1 on CPU); bad boundaries are refused."""
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.reference.losses import AGG_MODES

LENGTHS = [5, 1, 9, 3, 7]  # a one-token sequence too
V, H = 11, 6


def _padded_and_packed(per_token: torch.Tensor):
    """[S, Lmax] padded rows (zeros after each sequence) -> the packed [1, N] row of the same tokens."""
    return torch.cat([per_token[i, :n] for i, n in enumerate(LENGTHS)]).unsqueeze(0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, width = len(LENGTHS), max(LENGTHS)
    valid = torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask = (torch.rand(rows, width, generator=g) > 0.25) & valid
    mask[3] = False  # a sequence without a valid token
    old = torch.randn(rows, width, generator=g) * 0.5 - 1.0
    return dict(
        valid=valid, mask=mask, old=old, logp=old + torch.randn(rows, width, generator=g) * 0.3,
        adv=torch.randn(rows, width, generator=g), ref=old + torch.randn(rows, width, generator=g) * 0.2,
        isw=torch.rand(rows, width, generator=g) + 0.5, values=torch.randn(rows, width, generator=g),
        old_values=torch.randn(rows, width, generator=g), returns=torch.randn(rows, width, generator=g),
        logits=torch.randn(rows, width, V, generator=g) * 2, labels=torch.randint(0, V, (rows, width), generator=g),
        hidden=torch.randn(rows, width, H, generator=g), weight=torch.randn(V, H, generator=g) * 0.5,
    )


def _cu():
    return torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist())


def _pack_leaf(t):
    return torch.cat([t[i, :n] for i, n in enumerate(LENGTHS)]).unsqueeze(0)


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])  # sequence: GSPO's ratio, one per sequence of cu_seqlens
def test_policy_and_value_losses_packed_equal_padded(backend, name, agg, level):
    backend(name)
    x = _inputs()
    counts = dict(num_tokens=None, num_seqs=None, importance_sampling_level=level)
    # padded
    logp = x["logp"].clone().requires_grad_(True)
    loss, stats = ops.ppo_policy_loss(logp, x["old"], x["adv"], x["mask"], agg=agg, is_weights=x["isw"],
                                      dual_clip=3.0, **counts)
    (grad,) = torch.autograd.grad(loss, logp)
    # packed
    p = {k: _pack_leaf(x[k]) for k in ("logp", "old", "adv", "mask", "isw")}
    plogp = p["logp"].clone().requires_grad_(True)
    ploss, pstats = ops.ppo_policy_loss(plogp, p["old"], p["adv"], p["mask"], agg=agg, is_weights=p["isw"],
                                        dual_clip=3.0, cu_seqlens=_cu(), **counts)
    (pgrad,) = torch.autograd.grad(ploss, plogp)
    torch.testing.assert_close(ploss, loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pgrad, _pack_leaf(grad), atol=1e-6, rtol=1e-6)
    for key in stats:
        torch.testing.assert_close(pstats[key], stats[key], atol=1e-6, rtol=1e-6)
    # value loss
    values = x["values"].clone().requires_grad_(True)
    if level == "sequence":
        return  # the value loss has no ratio
    vloss, _ = ops.ppo_value_loss(values, x["old_values"], x["returns"], x["mask"], clip=0.2, agg=agg)
    (vgrad,) = torch.autograd.grad(vloss, values)
    pvalues = _pack_leaf(x["values"]).requires_grad_(True)
    pvloss, _ = ops.ppo_value_loss(pvalues, _pack_leaf(x["old_values"]), _pack_leaf(x["returns"]),
                                   _pack_leaf(x["mask"]), clip=0.2, agg=agg, cu_seqlens=_cu())
    (pvgrad,) = torch.autograd.grad(pvloss, pvalues)
    torch.testing.assert_close(pvloss, vloss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pvgrad, _pack_leaf(vgrad), atol=1e-6, rtol=1e-6)


def test_sequence_modes_need_the_boundaries():
    """Without cu_seqlens a packed row is one sequence: the seq-mean modes differ (the test above can fail)."""
    x = _inputs()
    p = {k: _pack_leaf(x[k]) for k in ("logp", "old", "adv", "mask")}
    padded, _ = ops.ppo_policy_loss(x["logp"], x["old"], x["adv"], x["mask"], agg="seq-mean-token-mean")
    whole_row, _ = ops.ppo_policy_loss(p["logp"], p["old"], p["adv"], p["mask"], agg="seq-mean-token-mean")
    assert not torch.allclose(whole_row, padded, atol=1e-4)


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("fused", ["logits", "linear"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_losses_packed_equal_padded(backend, name, agg, fused, level):
    backend(name)
    x = _inputs(1)
    kw = dict(ref_logp=x["ref"], kl_coef=0.1, entropy_coef=0.01, temperature=0.7, agg=agg,
              importance_sampling_level=level)
    pk = dict(kw, ref_logp=_pack_leaf(x["ref"]), cu_seqlens=_cu())
    tensors = (x["old"], x["adv"], x["mask"])
    packed_tensors = tuple(_pack_leaf(t) for t in tensors)
    if fused == "logits":
        logits = x["logits"].clone().requires_grad_(True)
        loss, stats = ops.fused_ppo_loss(logits, x["labels"], *tensors, inplace_grad=False, **kw)
        (grad,) = torch.autograd.grad(loss, logits)
        plogits = _pack_leaf(x["logits"]).requires_grad_(True)
        ploss, pstats = ops.fused_ppo_loss(plogits, _pack_leaf(x["labels"]), *packed_tensors, inplace_grad=False,
                                           **pk)
        (pgrad,) = torch.autograd.grad(ploss, plogits)
        torch.testing.assert_close(pgrad, _pack_leaf(grad), atol=1e-6, rtol=1e-5)
    else:
        hidden, weight = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
        loss, stats = ops.fused_linear_ppo_loss(hidden, weight, x["labels"], *tensors, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight))
        phidden, pweight = _pack_leaf(x["hidden"]).requires_grad_(True), x["weight"].clone().requires_grad_(True)
        ploss, pstats = ops.fused_linear_ppo_loss(phidden, pweight, _pack_leaf(x["labels"]), *packed_tensors, **pk)
        pgrads = torch.autograd.grad(ploss, (phidden, pweight))
        torch.testing.assert_close(pgrads[0], _pack_leaf(grads[0]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pgrads[1], grads[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ploss, loss, atol=1e-6, rtol=1e-5)
    for key in ("clip_frac", "approx_kl", "kl", "entropy"):
        torch.testing.assert_close(pstats[key], stats[key], atol=1e-6, rtol=1e-5)


def test_per_sequence_reference_by_hand():
    """seq-mean-token-mean of a packed row = the mean over sequences of each sequence's own token-mean loss,
    computed here one sequence at a time (independent of both the padded and the packed paths)."""
    x = _inputs(2)
    p = {k: _pack_leaf(x[k]) for k in ("logp", "old", "adv", "mask")}
    loss, _ = ops.ppo_policy_loss(p["logp"], p["old"], p["adv"], p["mask"], agg="seq-mean-token-mean",
                                  cu_seqlens=_cu())
    per_seq = []
    for i, n in enumerate(LENGTHS):
        m = x["mask"][i, :n]
        if m.any():
            one, _ = ops.ppo_policy_loss(x["logp"][i, :n], x["old"][i, :n], x["adv"][i, :n], m, agg="token-mean")
            per_seq.append(one)
    torch.testing.assert_close(loss, torch.stack(per_seq).mean(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cu, message", [
    ([1, 5, 25], "start at 0"),
    ([0, 5, 24], "end at 25"),
    ([0, 5, 5, 25], "strictly increasing"),
    ([0, 9, 5, 25], "strictly increasing"),
    ([25], "at least 2"),
    (torch.tensor([0.0, 25.0]), "integer"),
    (torch.tensor([[0, 25]]), "1-D"),
])
def test_bad_cu_seqlens_named(cu, message):
    x = _inputs()
    p = {k: _pack_leaf(x[k]) for k in ("logp", "old", "adv", "mask")}
    assert p["logp"].shape[-1] == 25
    with pytest.raises((ValueError, TypeError), match=f"cu_seqlens.*{message}"):
        ops.ppo_policy_loss(p["logp"], p["old"], p["adv"], p["mask"], agg="seq-mean-token-mean", cu_seqlens=cu)


def test_cu_seqlens_with_padded_rows_refused():
    x = _inputs()
    with pytest.raises(ValueError, match="cu_seqlens.*packed row"):
        ops.ppo_value_loss(x["values"], x["old_values"], x["returns"], x["mask"], cu_seqlens=[0, 9])
