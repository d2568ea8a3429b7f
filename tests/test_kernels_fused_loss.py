"""Triton fused_ppo_loss against the unfused reference composition: loss, stats and d loss / d logits.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest) with the vocabulary chunk lowered to 64, so that
V = 300 spans five chunks. bf16 runs only on the GPU.
"""

import pytest
import torch
from _sm90 import compile_for_sm90

from rlhf_fast import _dispatch, ops
from rlhf_fast import reference as ref
from rlhf_fast.reference.losses import AGG_MODES

# The aten-op recorder and the Triton launch counter of the PPO loss kernels' host-work test.
from _host_work import ALLOCATIONS, RecordAten

V = 300
FULL = dict(
    kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, temperature=0.8, clip_low=0.2, clip_high=0.28,
    dual_clip=3.0,
)


@pytest.fixture(autouse=True)
def triton_backend(triton_small_chunks):
    """Every test here runs the Triton kernels (interpreter on CPU, small vocabulary chunks)."""


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(rows=3, steps=5, vocab=V, dtype=torch.float32, seed=0, temperature=0.8, scale=2.0, device=None,
               offset=0.0):
    """Logits plus per-token tensors whose ratios straddle the clip range (so every branch is taken).

    ``offset`` pushes the logits to +-offset (large-logit tests).
    """
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, steps, vocab, generator=g) * scale
    logits = (logits + offset * torch.sign(logits)).to(dtype)
    labels = torch.randint(0, vocab, (rows, steps), generator=g)
    labels.view(-1)[0], labels.view(-1)[-1] = 0, vocab - 1
    logp = ref.selective_log_softmax(logits.float().view(-1, vocab), labels.view(-1), temperature=temperature)
    logp = logp.view(rows, steps)
    old = logp + 0.4 * torch.randn(rows, steps, generator=g)
    ref_logp = logp + 0.3 * torch.randn(rows, steps, generator=g)
    adv = torch.randn(rows, steps, generator=g)
    mask = torch.rand(rows, steps, generator=g) > 0.25
    mask[:, 0] = True
    if rows > 2:
        mask[1] = False  # a fully masked row
    is_w = torch.rand(rows, steps, generator=g) + 0.5
    batch = dict(logits=logits, labels=labels, old_logp=old, advantages=adv, mask=mask, ref_logp=ref_logp,
                 is_weights=is_w)
    return {k: v.to(device) for k, v in batch.items()}


def run(impl, batch, upstream=1.0, *, leaf=False, **kw):
    """Loss, stats and d loss / d logits of one implementation on a fresh copy of the logits.

    The logits passed in are a non-leaf tensor (like an lm_head output; a leaf takes the out-of-place path of
    ``inplace_grad=True``), unless ``leaf``. Returns the gradient and the tensor passed in.
    """
    param = batch["logits"].detach().clone().requires_grad_(True)
    x = param if leaf else param.clone()
    args = {k: v for k, v in batch.items() if k != "logits"}
    args.update(kw)
    loss, stats = impl(x, args.pop("labels"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)
    (loss * upstream).backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, param.grad, x


def reference(batch, upstream=1.0, **kw):
    b = dict(batch, logits=batch["logits"].float())
    adv = b["advantages"]
    if adv.dim() == 1:
        b["advantages"] = adv.unsqueeze(-1).expand_as(b["old_logp"])
    kw = {k: v for k, v in kw.items() if k != "inplace_grad"}
    return run(ref.fused_ppo_loss, b, upstream, **kw)


def check(got, want, dtype=torch.float32, grad_tol=None, loss_tol=(1e-5, 1e-5), stat_tol=(1e-5, 1e-5)):
    loss, stats, grad, _ = got
    r_loss, r_stats, r_grad, _ = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, r_loss, atol=loss_tol[0], rtol=loss_tol[1])
    assert set(stats) == set(r_stats)
    for k in r_stats:
        assert stats[k].dtype == torch.float32 and stats[k].dim() == 0, k
        torch.testing.assert_close(stats[k], r_stats[k], atol=stat_tol[0], rtol=stat_tol[1], msg=lambda m: f"{k}: {m}")
    assert grad.dtype == dtype
    atol, rtol = grad_tol or (1e-6, 1e-5)
    torch.testing.assert_close(grad.float().reshape(r_grad.shape), r_grad, atol=atol, rtol=rtol)


def test_dispatch_picks_the_triton_kernel():
    from rlhf_fast.kernels import fused_loss

    assert _dispatch.resolve("fused_ppo_loss", torch.device(_device())) is fused_loss.fused_ppo_loss


@pytest.mark.parametrize("inplace_grad", [True, False])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_every_agg_mode_all_features(agg, inplace_grad):
    batch = make_batch(seed=1)
    kw = dict(FULL, agg=agg, ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    got = run(ops.fused_ppo_loss, batch, 0.37, inplace_grad=inplace_grad, **kw)
    want = reference(batch, 0.37, **kw)
    check(got, want)
    assert want[1]["clip_frac"] > 0  # the inputs exercise the clip branches
    assert got[2].abs().sum() > 0


@pytest.mark.parametrize("estimator,kl_coef", [("k1", 0.5), ("k2", 0.5), ("k3", 0.5), ("k3", 0.0)])
def test_kl_estimators(estimator, kl_coef):
    batch = make_batch(seed=2, temperature=1.0)
    kw = dict(ref_logp=batch["ref_logp"], kl_coef=kl_coef, kl_estimator=estimator, is_weights=None)
    check(run(ops.fused_ppo_loss, batch, **kw), reference(batch, **kw))


def test_defaults_no_ref_no_entropy():
    batch = make_batch(seed=3, temperature=1.0)
    kw = dict(ref_logp=None, is_weights=None)
    got = run(ops.fused_ppo_loss, batch, **kw)
    check(got, reference(batch, **kw))
    assert got[1]["kl"] == 0 and "dual_clip_frac" not in got[1]


def test_dual_clip_and_asymmetric_clip_are_taken():
    batch = make_batch(rows=4, steps=6, seed=4, temperature=1.0)
    batch["advantages"] = -batch["advantages"].abs() - 0.1  # all negative: the dual clip can bite
    batch["old_logp"] = batch["old_logp"] - 1.5  # ratios well above 1 + clip_high
    kw = dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0, ref_logp=None, is_weights=batch["is_weights"])
    got = run(ops.fused_ppo_loss, batch, **kw)
    check(got, reference(batch, **kw))
    assert got[1]["dual_clip_frac"] > 0


@pytest.mark.parametrize(
    "counts",
    [dict(num_tokens=37), dict(num_tokens=torch.tensor(11.0)), dict(num_seqs=9, agg="seq-mean-token-mean"),
     dict(num_seqs=torch.tensor(5), agg="seq-mean-token-sum"), dict(loss_scale=64, agg="seq-mean-token-sum-norm")],
)
def test_count_overrides(counts):
    batch = make_batch(seed=5)
    kw = dict(FULL, ref_logp=batch["ref_logp"], **counts)
    check(run(ops.fused_ppo_loss, batch, **kw), reference(batch, **kw))


def test_per_sequence_advantages_and_int32_labels():
    batch = make_batch(seed=6)
    batch["advantages"] = torch.randn(3, device=_device())
    batch["labels"] = batch["labels"].to(torch.int32)
    kw = dict(FULL, ref_logp=batch["ref_logp"])
    want = reference(dict(batch, labels=batch["labels"].long()), **kw)
    check(run(ops.fused_ppo_loss, batch, **kw), want)


def test_flat_tokens_and_single_step():
    batch = make_batch(rows=1, steps=7, seed=7)
    flat = {k: v[0] for k, v in batch.items()}  # logits [N, V], per-token [N]
    kw = dict(FULL, ref_logp=flat["ref_logp"], is_weights=flat["is_weights"])
    check(run(ops.fused_ppo_loss, flat, **kw), reference(batch, **dict(kw, ref_logp=batch["ref_logp"],
                                                                       is_weights=batch["is_weights"])))
    single = make_batch(rows=4, steps=1, seed=8)  # T = 1
    kw = dict(FULL, ref_logp=single["ref_logp"], agg="seq-mean-token-sum-norm")
    check(run(ops.fused_ppo_loss, single, **kw), reference(single, **kw))


@pytest.mark.parametrize("inplace_grad", [True, False])
def test_everything_masked_gives_zero_not_nan(inplace_grad):
    batch = make_batch(seed=9)
    batch["mask"] = torch.zeros_like(batch["mask"])
    kw = dict(FULL, ref_logp=batch["ref_logp"], agg="seq-mean-token-mean")
    got = run(ops.fused_ppo_loss, batch, inplace_grad=inplace_grad, **kw)
    check(got, reference(batch, **kw))
    assert got[0] == 0 and (got[2] == 0).all()


def test_large_logits():
    batch = make_batch(seed=10, scale=1.0, temperature=1.0, offset=1e4)
    kw = dict(FULL, temperature=1.0, ref_logp=batch["ref_logp"])
    got = run(ops.fused_ppo_loss, batch, **kw)
    assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all()
    # The reference's entropy lse - sum(p z) rounds at float32's ~1e-3 spacing of |z| ~ 1e4; the kernel
    # accumulates relative to the running max, so it is held to a float64 oracle tightly instead.
    check(got, reference(batch, **kw), grad_tol=(1e-4, 1e-4), loss_tol=(1e-4, 1e-4), stat_tol=(1e-3, 1e-4))
    z = batch["logits"].double() / kw["temperature"]
    ent64 = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    m = batch["mask"].double()
    torch.testing.assert_close(got[1]["entropy"].double(), (ent64 * m).sum() / m.sum(), atol=1e-5, rtol=1e-6)


def test_fp16_logits_loose(tol):
    batch = make_batch(seed=11, dtype=torch.float16)
    kw = dict(FULL, ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    check(run(ops.fused_ppo_loss, batch, 2.0, **kw), reference(batch, 2.0, **kw), dtype=torch.float16,
          grad_tol=tol(torch.float16))


@pytest.mark.parametrize("inplace_grad", [True, False])
def test_sliced_logits_view(inplace_grad):
    """The usual call: logits[:, :-1] of a model output (a strided view), gradient flowing back through the slice."""
    batch = make_batch(rows=2, steps=6, seed=16)
    full = batch["logits"].detach().clone().requires_grad_(True)
    args = {k: v[:, :-1] for k, v in batch.items() if k != "logits"}
    kw = dict(FULL, ref_logp=args.pop("ref_logp"), is_weights=args.pop("is_weights"))
    loss, stats = ops.fused_ppo_loss(full[:, :-1], args["labels"], args["old_logp"], args["advantages"],
                                     args["mask"], inplace_grad=inplace_grad, **kw)
    (0.5 * loss).backward()
    ref_full = batch["logits"].detach().clone().requires_grad_(True)
    r_loss, r_stats = ref.fused_ppo_loss(ref_full[:, :-1], args["labels"], args["old_logp"], args["advantages"],
                                         args["mask"], **kw)
    (0.5 * r_loss).backward()
    torch.testing.assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.grad, ref_full.grad, atol=1e-6, rtol=1e-5)
    assert (full.grad[:, -1] == 0).all()
    assert torch.equal(full.detach(), batch["logits"])  # a view of a leaf: never written, even in place


def test_inplace_grad_false_leaves_logits_untouched():
    batch = make_batch(seed=12)
    before = batch["logits"].clone()
    x = batch["logits"].requires_grad_(True)
    loss, _ = ops.fused_ppo_loss(x, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"],
                                 inplace_grad=False, entropy_coef=0.01)
    loss.backward()
    assert torch.equal(x.detach(), before)


def test_inplace_grad_true_overwrites_logits_with_the_gradient():
    batch = make_batch(seed=13)
    kw = dict(FULL, ref_logp=batch["ref_logp"])
    loss, _, grad, x = run(ops.fused_ppo_loss, batch, 3.0, inplace_grad=True, **kw)
    assert torch.equal(x.detach(), grad)  # the logits buffer now holds the (scaled) gradient
    assert not torch.equal(x.detach(), batch["logits"])


def test_no_grad_path_matches_and_never_writes():
    batch = make_batch(seed=14)
    kw = dict(FULL, ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    logits = batch["logits"].clone()
    args = (batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"])
    loss, stats = ops.fused_ppo_loss(logits, *args, inplace_grad=True, **kw)  # no requires_grad
    assert torch.equal(logits, batch["logits"])
    with torch.no_grad():
        x = batch["logits"].clone().requires_grad_(True)
        loss2, stats2 = ops.fused_ppo_loss(x, *args, inplace_grad=True, **kw)
    assert torch.equal(x.detach(), batch["logits"])
    g_loss, g_stats, _, _ = run(ops.fused_ppo_loss, batch, inplace_grad=True, **kw)
    assert torch.equal(loss, loss2) and torch.equal(loss, g_loss)
    assert all(torch.equal(stats[k], g_stats[k]) and torch.equal(stats[k], stats2[k]) for k in stats)


def test_batch_invariance_bitwise():
    """Per-token terms and gradient rows do not depend on the other rows (token-sum: batch-free weights)."""
    from rlhf_fast.kernels import fused_loss

    batch = make_batch(rows=6, steps=4, seed=15, dtype=torch.float16)
    kw = dict(FULL, agg="token-sum", ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])

    def per_token(b):
        rows, steps = b["old_logp"].shape
        out = fused_loss.fused_forward(
            b["logits"], b["labels"], b["old_logp"], b["advantages"], b["mask"], ref_logp=b["ref_logp"],
            is_weights=b["is_weights"], kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, temperature=0.8,
            clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-sum", counts=(0.0, 0.0, 0.0), need_grad=True,
        )
        assert torch.equal(out["work"][:rows], torch.ones(rows))  # f_r of token-sum
        # The finalize workspace after f: [l * m, m, statistics...], each [N].
        terms = out["work"][rows:].view(-1, rows * steps).T.reshape(rows, steps, -1)
        valid = b["mask"].view(rows, steps, 1)
        # lse / ent are only written for valid tokens (masked ones never read their logits).
        return [terms] + [torch.where(valid, out[k].view(rows, steps, 1), 0.0)
                          for k in ("lse", "ent", "g_logp", "g_ent")]

    full = per_token(batch)
    _, _, full_grad, _ = run(ops.fused_ppo_loss, batch, **kw)
    for start, stop in [(0, 1), (2, 5)]:
        part_batch = {k: v[start:stop] for k, v in batch.items()}
        for a, b in zip(full, per_token(part_batch)):
            assert torch.equal(a[start:stop], b)
        _, _, part_grad, _ = run(ops.fused_ppo_loss, part_batch, **dict(kw, ref_logp=part_batch["ref_logp"],
                                                                      is_weights=part_batch["is_weights"]))
        assert torch.equal(full_grad[start:stop], part_grad)
    again = run(ops.fused_ppo_loss, batch, **kw)
    assert torch.equal(again[2], full_grad)


@pytest.mark.parametrize("inplace_grad", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.uint8, torch.float32, torch.bfloat16])
def test_mask_dtypes_and_per_sequence_advantages(mask_dtype, inplace_grad):
    """The mask is read in its own dtype through its strides (no float copy); advantages [R] are a stride-0 view."""
    batch = make_batch(rows=4, steps=6, seed=17)
    batch["mask"] = batch["mask"].to(mask_dtype)
    batch["advantages"] = torch.randn(4, device=_device())
    kw = dict(FULL, agg="seq-mean-token-mean", ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    check(run(ops.fused_ppo_loss, batch, 0.6, inplace_grad=inplace_grad, **kw), reference(batch, 0.6, **kw))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_finalize_in_many_small_steps(agg, monkeypatch):
    """The finalize's loops over rows, row chunks and statistic partials, each taking several steps."""
    from rlhf_fast.kernels import fused_loss

    monkeypatch.setattr(fused_loss, "FINAL_TILE", 4)  # rows of 7 tokens: two chunks each, one row per step
    monkeypatch.setattr(fused_loss, "FINAL_STAT_BLOCK", 8)  # 35 tokens: five steps, the last one partial
    batch = make_batch(rows=5, steps=7, seed=18)
    kw = dict(FULL, agg=agg, ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    check(run(ops.fused_ppo_loss, batch, 1.3, inplace_grad=False, **kw), reference(batch, 1.3, **kw))
    check(run(ops.fused_ppo_loss, batch, 1.3, inplace_grad=True, **kw), reference(batch, 1.3, **kw))


def test_repeated_calls_are_bitwise_equal():
    batch = make_batch(rows=4, steps=9, seed=19)
    kw = dict(FULL, agg="seq-mean-token-mean", ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    first = run(ops.fused_ppo_loss, batch, 0.9, **kw)
    second = run(ops.fused_ppo_loss, batch, 0.9, **kw)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


# ---- host work: the launches and nothing else on the device ------------------------------------------------------


@pytest.mark.parametrize("entry", ["ops", "kernel"])
@pytest.mark.parametrize("inplace_grad", [True, False])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_forward_backward_runs_only_the_kernels(count_launches, agg, inplace_grad, entry):
    """Forward + backward with per-sequence advantages: allocations, views and the Triton launches (statistics,
    finalize, gradient; the in-place path adds the rescale, which returns at once when the upstream gradient is
    1), and no aten compute op, except ``rlhf_fast.ops``'s label-range check (one reduction and one read)."""
    from rlhf_fast import _validation
    from rlhf_fast.kernels import fused_loss

    launches, state = count_launches
    batch = make_batch(rows=3, steps=5, seed=40)
    adv = torch.randn(3, device=_device())
    kw = dict(agg=agg, inplace_grad=inplace_grad, entropy_coef=0.01, ref_logp=batch["ref_logp"], kl_coef=0.1,
              is_weights=batch["is_weights"])
    args = (batch["labels"], batch["old_logp"], adv, batch["mask"])
    op = ops.fused_ppo_loss if entry == "ops" else fused_loss.fused_ppo_loss
    x = batch["logits"].detach().clone().requires_grad_(True) * 1  # a non-leaf, like an lm_head output
    upstream = torch.tensor(0.7, device=_device())
    launches.clear()
    with RecordAten() as rec:
        state["record"] = rec
        loss, stats = op(x, *args, **kw)
        (grad,) = torch.autograd.grad(loss, x, upstream)
    state["record"] = None
    compute = [str(f) for f in rec.ops if not f.is_view and str(f) not in ALLOCATIONS]
    expected = []
    if entry == "ops":
        with RecordAten() as check_labels:
            _validation.check_labels("labels", batch["labels"], V)
        expected = [str(f) for f in check_labels.ops]
    assert compute == expected, compute
    want = ["_ppo_fwd_kernel", "_finalize_kernel", "_logits_grad_kernel"]
    assert launches == (want + ["_scale_rows_kernel"] if inplace_grad else want), launches
    r_loss, r_stats, r_grad, _ = reference(dict(batch, advantages=adv), 0.7, **kw)
    torch.testing.assert_close(loss.detach(), r_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, r_grad, atol=1e-6, rtol=1e-5)
    assert set(stats) == set(r_stats)
    for k in r_stats:
        torch.testing.assert_close(stats[k], r_stats[k], atol=1e-5, rtol=1e-5)


# ---- inplace_grad=True: when the gradient may overwrite the logits, and what happens when it may not ----------


def _call(logits, batch, **kw):
    return ops.fused_ppo_loss(logits, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"], **kw)


def test_inplace_path_decision():
    """Host-side checks only: non-leaf fp32 / bf16 logits (also sliced) keep the in-place fast path."""
    from rlhf_fast.kernels.fused_loss import _can_write_gradient_inplace

    leaf = torch.randn(2, 4, 8, requires_grad=True)
    out = leaf * 1  # a non-leaf, like an lm_head output
    assert _can_write_gradient_inplace(out)
    assert _can_write_gradient_inplace(out[:, :-1])
    assert _can_write_gradient_inplace(out.reshape(8, 8).reshape(2, 4, 8))
    assert _can_write_gradient_inplace(out.to(torch.bfloat16))
    assert _can_write_gradient_inplace(out[:1].reshape(1, 4, 8))
    assert not _can_write_gradient_inplace(out.to(torch.float16))  # loss scaling: see below
    assert not _can_write_gradient_inplace(leaf)
    assert not _can_write_gradient_inplace(leaf[:, :-1])  # a view of a leaf
    assert not _can_write_gradient_inplace(out[:1].expand(3, 4, 8))  # rows overlap
    assert not _can_write_gradient_inplace(out[:, :1].expand(2, 4, 8))  # time steps overlap


@pytest.mark.parametrize("inplace_grad", [True, False])
def test_expanded_logits_get_the_right_gradient(inplace_grad):
    """Internally overlapping logits (several rows on one memory) take the out-of-place path."""
    batch = make_batch(rows=3, steps=4, seed=30)
    kw = dict(FULL, ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    base_batch = dict(batch, logits=batch["logits"][:1])

    def grad_of(impl, **extra):
        base = base_batch["logits"].float().detach().clone().requires_grad_(True)
        loss, _ = impl((base * 1).expand(3, 4, V), batch["labels"], batch["old_logp"], batch["advantages"],
                       batch["mask"], **kw, **extra)
        (0.7 * loss).backward()
        return loss.detach(), base.grad

    loss, grad = grad_of(ops.fused_ppo_loss, inplace_grad=inplace_grad)
    r_loss, r_grad = grad_of(ref.fused_ppo_loss)
    torch.testing.assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, r_grad, atol=1e-6, rtol=1e-5)


def test_fp16_logits_under_loss_scaling_keep_small_gradients():
    """GradScaler-style ``(loss * 65536).backward()`` on fp16 logits: the scale is applied before the gradient
    is rounded to fp16 (out-of-place path), so entries below fp16's range at upstream 1 survive."""
    batch = make_batch(rows=4, steps=8, vocab=512, dtype=torch.float16, seed=31)
    kw = dict(ref_logp=None, is_weights=None, num_tokens=2e5)
    _, _, grad, _ = run(ops.fused_ppo_loss, batch, 65536.0, inplace_grad=True, **kw)
    _, _, r_grad, _ = reference(batch, 65536.0, **kw)
    want_nonzero = int((r_grad.to(torch.float16) != 0).sum())
    assert want_nonzero > 1000
    assert int((grad != 0).sum()) >= 0.99 * want_nonzero
    torch.testing.assert_close(grad.float(), r_grad, atol=1e-3, rtol=2e-2)


def test_second_backward_through_inplace_gradient_raises():
    batch = make_batch(seed=32)
    kw = dict(FULL, ref_logp=batch["ref_logp"])
    x = batch["logits"].detach().clone().requires_grad_(True)
    loss, _ = _call(x * 1, batch, inplace_grad=True, **kw)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="supports a single backward"):
        (2.0 * loss).backward()
    torch.testing.assert_close(x.grad, first)  # no partial accumulation either
    # The out-of-place path supports retain_graph and any number of backward passes.
    y = batch["logits"].detach().clone().requires_grad_(True)
    loss, _ = _call(y * 1, batch, inplace_grad=False, **kw)
    loss.backward(retain_graph=True)
    (2.0 * loss).backward()
    torch.testing.assert_close(y.grad, 3.0 * first, atol=1e-6, rtol=1e-5)


def test_inplace_gradient_bumps_the_version_of_saved_logits():
    """Another node that saved the logits for its backward must not silently read the gradient instead."""
    batch = make_batch(seed=33)
    kw = dict(FULL, ref_logp=batch["ref_logp"])

    def total(inplace_grad):
        x = batch["logits"].detach().clone().requires_grad_(True)
        y = x * 1
        sq = (y * y).sum()  # saves y
        loss, _ = _call(y, batch, inplace_grad=inplace_grad, **kw)
        (loss + 0.01 * sq).backward()
        return x.grad

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total(True)
    x = batch["logits"].detach().clone().requires_grad_(True)
    r_loss, _ = ref.fused_ppo_loss(x, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"], **kw)
    (r_loss + 0.01 * (x * x).sum()).backward()
    torch.testing.assert_close(total(False), x.grad, atol=1e-6, rtol=1e-5)


def test_leaf_logits_are_never_overwritten():
    batch = make_batch(seed=34)
    kw = dict(FULL, ref_logp=batch["ref_logp"])
    loss, stats, grad, x = run(ops.fused_ppo_loss, batch, 2.0, leaf=True, inplace_grad=True, **kw)
    assert torch.equal(x.detach(), batch["logits"])
    assert x.grad.data_ptr() != x.data_ptr()
    check((loss, stats, grad, x), reference(batch, 2.0, **kw))


@pytest.mark.parametrize("inplace_grad", [True, False])
def test_double_backward_raises(inplace_grad):
    batch = make_batch(seed=35)
    x = batch["logits"].detach().clone().requires_grad_(True)
    loss, _ = _call(x * 1, batch, inplace_grad=inplace_grad, entropy_coef=0.01)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_logprobs_and_linear_double_backward_raise():
    batch = make_batch(seed=36)
    logits = batch["logits"].view(-1, V).detach().clone().requires_grad_(True)
    labels = batch["labels"].view(-1)
    logp, ent = ops.logprobs_and_entropy(logits, labels)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((logp + ent).sum(), logits, create_graph=True)
    logp = ops.selective_log_softmax(logits, labels)
    (g,) = torch.autograd.grad(logp.sum(), logits)  # first order still works
    assert not g.requires_grad
    h = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    logp = ops.linear_logprobs(h, w, labels[:4])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(logp.sum(), (h, w), create_graph=True)


# ---- GPU: bf16 at realistic sizes ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("inplace_grad", [True, False])
def test_gpu_bf16_realistic(inplace_grad, tol):
    batch = make_batch(rows=2, steps=256, vocab=151936, dtype=torch.bfloat16, seed=20, device="cuda")
    kw = dict(FULL, agg="seq-mean-token-mean", ref_logp=batch["ref_logp"], is_weights=batch["is_weights"])
    got = run(ops.fused_ppo_loss, batch, 0.5, inplace_grad=inplace_grad, **kw)
    want = reference(batch, 0.5, **kw)
    # Relative to the largest entry: the gradient is ~1e-2 at most here, so tol(bf16)'s atol would pass zeros.
    grad_tol = (1e-3 * want[2].abs().max().item(), 1e-2)
    check(got, want, dtype=torch.bfloat16, grad_tol=grad_tol, loss_tol=(1e-4, 1e-4))


@pytest.mark.gpu
def test_gpu_odd_vocab_and_misaligned_slices_are_bitwise_invariant():
    """V not a multiple of 16: rows start at every alignment, so a one-row slice gets a different specialisation
    of the kernel than the full batch; the reduction order must not change with it."""
    batch = make_batch(rows=6, steps=8, vocab=32003, dtype=torch.bfloat16, seed=22, device="cuda")
    kw = dict(FULL, agg="token-sum", ref_logp=batch["ref_logp"])
    full = run(ops.fused_ppo_loss, batch, **kw)[2]
    for r in (2, 3):  # row 1 is fully masked (make_batch): its gradient is zero either way
        part = {k: v[r:r + 1] for k, v in batch.items()}
        assert torch.equal(full[r:r + 1], run(ops.fused_ppo_loss, part, **dict(kw, ref_logp=part["ref_logp"]))[2])
    logits, labels = batch["logits"].view(-1, 32003), batch["labels"].view(-1)
    with torch.no_grad():
        whole = ops.logprobs_and_entropy(logits, labels)
        for i in (1, 5, 13):
            one = ops.logprobs_and_entropy(logits[i:i + 1], labels[i:i + 1])
            assert all(torch.equal(a[i:i + 1], b) for a, b in zip(whole, one))


@pytest.mark.gpu
def test_gpu_bf16_batch_invariance():
    batch = make_batch(rows=8, steps=64, vocab=151936, dtype=torch.bfloat16, seed=21, device="cuda")
    kw = dict(FULL, agg="token-sum", ref_logp=batch["ref_logp"])
    full = run(ops.fused_ppo_loss, batch, **kw)[2]
    part = {k: v[3:4] for k, v in batch.items()}
    assert torch.equal(full[3:4], run(ops.fused_ppo_loss, part, **dict(kw, ref_logp=part["ref_logp"]))[2])


# ---- the real compiler: lower the loss kernel to sm_90 machine code without a GPU ------------------------------

COMPILE_SCRIPT = """
    from rlhf_fast.kernels import fused_loss as F

    types = {n: "*fp32" for n in F._ppo_fwd_kernel.arg_names if n.isupper() and n not in ("R", "T", "V")}
    types.update({"X": "*bf16", "LABELS": "*i64", "OLD": "*bf16", "ADV": "*fp16", "M": "*i1"})
    types.update({n: "i64" for n in F._ppo_fwd_kernel.arg_names if n.startswith("stride_")})
    types.update({k: "fp32" for k in ("inv_t", "clip_low", "clip_high", "dual_clip", "kl_coef", "ent_coef")})
    everything = {"HAS_TEMP": True, "HAS_REF": True, "KL_IN_LOSS": True, "KL_EST": 3, "HAS_ISW": True,
                  "HAS_DUAL": True, "ENT_IN_LOSS": True, "NEED_GRAD": True, "BLOCK_V": 2048}
    compile_one(F._ppo_fwd_kernel, types, everything, num_warps=1, num_stages=2)
    nothing = {k: False for k in everything if k.startswith(("HAS", "KL_IN", "ENT", "NEED"))}
    compile_one(F._ppo_fwd_kernel, dict(types, X="*fp16", LABELS="*i32", M="*u8", clip_low="fp64", kl_coef="fp64",
                                        stride_at="i32"),
                dict(everything, KL_EST=1, **nothing), num_warps=4, num_stages=2)
    compile_one(F._ppo_fwd_kernel, dict(types, X="*fp32", M="*fp32"), dict(everything, KL_EST=2, HAS_ISW=False),
                num_warps=1)
    print("compiled")
    """


def test_kernel_compiles_for_sm90():
    compile_for_sm90(COMPILE_SCRIPT)


@pytest.mark.parametrize("inplace_grad", [True, False])
def test_fused_loss_is_its_own_tensor_not_a_view(inplace_grad):
    """``loss /= accumulation_steps`` works: the loss is not a view of the statistics' buffer."""
    batch = make_batch(seed=44)
    kw = dict(FULL, agg="token-mean", ref_logp=batch["ref_logp"])
    grads = []
    for impl in (ops.fused_ppo_loss, ref.fused_ppo_loss):
        param = batch["logits"].detach().clone().requires_grad_(True)
        args = {k: v for k, v in batch.items() if k not in ("logits", "ref_logp", "is_weights")}
        extra = dict(inplace_grad=inplace_grad) if impl is ops.fused_ppo_loss else {}
        loss, stats = impl(param.clone(), args["labels"], args["old_logp"], args["advantages"], args["mask"],
                           **kw, **extra)
        loss /= 3
        stats["entropy"] *= 2
        loss.backward()
        grads.append(param.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_inplace_gradient_is_a_plain_tensor():
    """The in-place path hands out the logits buffer as the gradient, detached: like any autograd gradient it does
    not require grad and can be updated in place."""
    batch = make_batch(seed=45)
    x = batch["logits"].detach().clone().requires_grad_(True) * 1.0  # non-leaf: the in-place path
    loss, _ = ops.fused_ppo_loss(x, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"],
                                 inplace_grad=True)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.data_ptr() == x.data_ptr()  # it really was the in-place path
    assert not grad.requires_grad
    grad.mul_(2.0)


def test_second_call_on_overwritten_logits_is_refused():
    """After an in-place call the buffer holds gradients: reading it again as logits is refused (not silently
    wrong), through any view of it; new values written into the buffer make it logits again."""
    batch = make_batch(seed=46)
    args = (batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"])
    base = batch["logits"].detach().clone().requires_grad_(True)
    padded = torch.cat([base, base[:, :1]], dim=1)  # a model output with one position too many
    loss, _ = ops.fused_ppo_loss(padded[:, :-1], *args, inplace_grad=True)
    loss.backward()
    with pytest.raises(ValueError, match=r"logits: expected logits, got a buffer that holds the gradient"):
        ops.fused_ppo_loss(padded[:, :-1], *args, inplace_grad=True)
    with torch.no_grad(), pytest.raises(ValueError, match=r"logits: expected logits"):
        ops.fused_ppo_loss(padded[:, :-1], *args)
    with torch.no_grad():
        padded.copy_(torch.cat([batch["logits"], batch["logits"][:, :1]], dim=1))  # fresh logits, same buffer
    ops.fused_ppo_loss(padded[:, :-1], *args, inplace_grad=True)
    out_of_place = batch["logits"].detach().clone().requires_grad_(True) * 1.0
    for _ in range(2):  # the out-of-place path leaves the logits alone: no refusal
        torch.autograd.grad(ops.fused_ppo_loss(out_of_place, *args, inplace_grad=False)[0], out_of_place)
