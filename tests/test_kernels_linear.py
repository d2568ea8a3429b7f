"""Triton fused linear log-probs / entropy / PPO loss against materialised logits.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with fp32 / fp16 inputs at tiny shapes; the
interpreter's tile config (16 tokens x 32 vocab columns, 2 tiles per vocabulary split, 64-column backward
chunks) makes V=201 cover several splits and chunks with a ragged last tile, N=37 a ragged token block and
H=40 a ragged K slice. bf16 and realistic sizes are covered by the `gpu` tests.
"""
import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast._dispatch import resolve
from rlhf_fast.kernels import linear as K

N, H, V = 37, 40, 201


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(n=N, h=H, v=V, dtype=torch.float32, bias=False, seed=0, device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.6).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) * 0.4).to(device=device, dtype=dtype)
    b = (torch.randn(v, generator=g) * 0.3).to(device=device, dtype=dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, b, labels


def _oracle(hidden, weight, bias, labels, temperature):
    """fp32 materialised logits -> log_softmax: the oracle the issue names (hidden @ weight.T, then log-softmax)."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _leaves(hidden, weight, bias, dtype):
    """Kernel leaves in ``dtype`` and fp32 oracle leaves with the same values."""
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref = [t.detach().float().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    return ours, ref


def _close(actual, expected, dtype, tol, what):
    atol, rtol = tol(dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------------------
# linear_logprobs
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_forward_backward(dtype, with_bias, temperature, tol):
    hidden, weight, bias, labels = _inputs(dtype=dtype, bias=with_bias, seed=1)
    (h, w, b), (hr, wr, br) = _leaves(hidden, weight, bias, dtype)
    logp, entropy = K.linear_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True)
    logp_r, entropy_r = _oracle(hr, wr, br, labels, temperature)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    # Forward numbers come from fp32 accumulation over exact fp16 products: tight for both dtypes.
    _close(logp, logp_r, torch.float32, tol, "logp")
    _close(entropy, entropy_r, torch.float32, tol, "entropy")

    g = torch.Generator().manual_seed(7)
    g_lp = torch.randn(N, generator=g).to(logp.device)
    g_ent = torch.randn(N, generator=g).to(logp.device)
    (logp * g_lp + entropy * g_ent).sum().backward()
    (logp_r * g_lp + entropy_r * g_ent).sum().backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    _close(h.grad, hr.grad, dtype, tol, "d_hidden")
    _close(w.grad, wr.grad, dtype, tol, "d_weight")
    if with_bias:
        assert b.grad.dtype == dtype
        _close(b.grad, br.grad, dtype, tol, "d_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dweight_by_torch_mm_matches_triton_kernel(dtype, tol, monkeypatch):
    """RLHF_FAST_LINEAR_DWEIGHT=torch (cuBLAS on a GPU) gives the weight gradient of the Triton GEMM; the other
    gradients are the same tensors bit for bit (the switch touches d_weight only)."""
    hidden, weight, bias, labels = _inputs(dtype=dtype, bias=True, seed=11)
    grads = {}
    for choice in ("triton", "torch"):
        monkeypatch.setenv("RLHF_FAST_LINEAR_DWEIGHT", choice)
        (h, w, b), _ = _leaves(hidden, weight, bias, dtype)
        logp, ent = K.linear_logprobs(h, w, labels, bias=b, temperature=0.8, return_entropy=True)
        (logp - 0.3 * ent).sum().backward()
        grads[choice] = (h.grad, w.grad, b.grad)
    assert torch.equal(grads["torch"][0], grads["triton"][0]) and torch.equal(grads["torch"][2], grads["triton"][2])
    assert grads["torch"][1].dtype == dtype
    _close(grads["torch"][1], grads["triton"][1], dtype, tol, "d_weight")
    monkeypatch.setenv("RLHF_FAST_LINEAR_DWEIGHT", "cutlass")
    (h, w, b), _ = _leaves(hidden, weight, bias, dtype)
    with pytest.raises(ValueError, match=r"RLHF_FAST_LINEAR_DWEIGHT: expected one of \['triton', 'torch'\], got 'cutlass'"):
        K.linear_logprobs(h, w, labels).sum().backward()


def test_separate_gradient_tile_and_matmul_warps(tol, monkeypatch):
    """The logit-gradient kernel's own tile (another block shape, so other token blocks for the bias partials and
    ragged gradient tiles inside a chunk) and the matmuls' own warps give the default configuration's numbers."""
    import dataclasses

    hidden, weight, bias, labels = _inputs(bias=True, seed=12)
    default = K.kernel_config(H, V, torch.float32, hidden.device)
    launches = []

    class Recorded:  # records each launch's meta-parameters, then launches
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append((self.name, grid, meta))
                return self.kernel[grid](*args, **meta)
            return launch

    for name in ("_grad_logits_kernel", "_dhidden_kernel"):
        monkeypatch.setattr(K, name, Recorded(name, getattr(K, name)))
    results = []
    for cfg in (default, dataclasses.replace(default, grad_block_n=32, grad_block_v=16, grad_block_k=16,
                                             grad_num_warps=2, grad_num_stages=2, mm_num_warps=2, chunk_v=72)):
        monkeypatch.setattr(K, "kernel_config", lambda *args, cfg=cfg: cfg)
        (h, w, b), _ = _leaves(hidden, weight, bias, torch.float32)
        logp, ent = K.linear_logprobs(h, w, labels, bias=b, temperature=1.2, return_entropy=True)
        (logp * 0.7 - ent).sum().backward()
        results.append((logp, ent, h.grad, w.grad, b.grad))
    grad_meta = [(grid, m) for name, grid, m in launches if name == "_grad_logits_kernel" and m["BLOCK_N"] == 32]
    assert grad_meta and all(m["BLOCK_V"] == 16 and m["num_warps"] == 2 and grid[0] == 2 for grid, m in grad_meta)
    assert any(name == "_dhidden_kernel" and m["num_warps"] == 2 for name, _, m in launches)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), results[0][2:], results[1][2:]):
        _close(b, a, torch.float32, tol, name)


def test_linear_logprobs_matches_chunked_reference(tol):
    """Same numbers as rlhf_fast.reference.linear_logprobs (the CPU fallback), logp-only upstream gradient."""
    hidden, weight, bias, labels = _inputs(bias=True, seed=2)
    (h, w, b), (hr, wr, br) = _leaves(hidden, weight, bias, torch.float32)
    logp = K.linear_logprobs(h, w, labels, bias=b, temperature=1.3)
    logp_r = reference.linear_logprobs(hr, wr, labels, bias=br, temperature=1.3)
    _close(logp, logp_r, torch.float32, tol, "logp")
    g = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(logp.device)
    (logp * g).sum().backward()
    (logp_r * g).sum().backward()
    for ours, ref, name in ((h, hr, "d_hidden"), (w, wr, "d_weight"), (b, br, "d_bias")):
        _close(ours.grad, ref.grad, torch.float32, tol, name)


def test_entropy_only_gradient_and_frozen_weight(tol):
    """Upstream gradient on the entropy only (logp unused) and a weight without requires_grad."""
    hidden, weight, _, labels = _inputs(seed=4)
    h, hr = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    _, entropy = K.linear_logprobs(h, weight, labels, return_entropy=True)
    _, entropy_r = _oracle(hr, weight, None, labels, 1.0)
    entropy.pow(2).sum().backward()
    entropy_r.pow(2).sum().backward()
    _close(h.grad, hr.grad, torch.float32, tol, "d_hidden")
    assert weight.grad is None


def test_tied_embeddings(tol):
    """The LM head is the embedding matrix: gradients from the lookup and from the head add up."""
    _, weight, _, labels = _inputs(seed=5)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(6)).to(weight.device)
    emb = weight.clone().requires_grad_()
    emb_r = weight.clone().requires_grad_()

    def body(table):  # a toy "model": lookup, a nonlinearity, then the tied head
        return torch.tanh(table[ids]) * 1.5

    logp, ent = K.linear_logprobs(body(emb), emb, labels, return_entropy=True)
    logp_r, ent_r = _oracle(body(emb_r), emb_r, None, labels, 1.0)
    _close(logp, logp_r, torch.float32, tol, "logp")
    (logp.sum() + 0.3 * ent.sum()).backward()
    (logp_r.sum() + 0.3 * ent_r.sum()).backward()
    _close(emb.grad, emb_r.grad, torch.float32, tol, "d_embedding (lookup + head)")


def test_public_op_dispatches_to_kernel(backend, tol):
    """ops.linear_logprobs with RLHF_FAST_BACKEND=triton runs this module, with leading dims [B, T]."""
    backend("triton")
    assert resolve("linear_logprobs", _device()) is K.linear_logprobs
    assert resolve("fused_linear_ppo_loss", _device()) is K.fused_linear_ppo_loss
    hidden, weight, bias, labels = _inputs(n=3 * 11, bias=True, seed=8)
    logp, ent = rlhf_fast.ops.linear_logprobs(
        hidden.view(3, 11, H), weight, labels.view(3, 11).int(), bias=bias, return_entropy=True
    )
    logp_r, ent_r = _oracle(hidden, weight, bias, labels, 1.0)
    assert logp.shape == (3, 11) and ent.shape == (3, 11)
    _close(logp.reshape(-1), logp_r, torch.float32, tol, "logp")
    _close(ent.reshape(-1), ent_r, torch.float32, tol, "entropy")


def test_single_token_and_empty():
    hidden, weight, _, labels = _inputs(n=1, seed=9)
    h = hidden.clone().requires_grad_()
    logp = K.linear_logprobs(h, weight, labels)
    torch.testing.assert_close(logp, _oracle(hidden, weight, None, labels, 1.0)[0], atol=1e-5, rtol=1e-5)
    logp.sum().backward()
    assert torch.isfinite(h.grad).all()

    empty_h = hidden[:0].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = K.linear_logprobs(empty_h, w, labels[:0], return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert empty_h.grad.shape == (0, H)
    assert torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------------------------
# Batch invariance and determinism
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_invariance_bitwise(dtype):
    """A token's logp, entropy and d_hidden are bitwise the same alone and inside a bigger batch, wherever it
    sits in its token block; d_weight is bitwise reproducible."""
    hidden, weight, bias, labels = _inputs(n=45, dtype=dtype, bias=True, seed=10)
    g = torch.randn(45, generator=torch.Generator().manual_seed(11)).to(hidden.device)

    def run(rows):
        h = hidden[rows].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp, ent = K.linear_logprobs(h, w, labels[rows], bias=bias, temperature=0.9, return_entropy=True)
        (logp * g[rows] + 0.5 * ent).sum().backward()
        return logp, ent, h.grad, w.grad

    if not _dot_is_row_invariant():
        # The interpreter runs tl.dot as an fp32 numpy.matmul, whose BLAS may round a row differently by its place
        # in the tile (OpenBLAS's Haswell sgemm does on AMD EPYC): bitwise equality is then the BLAS's property,
        # not the kernel's. The rows must still agree to rounding; on a GPU (and other CPUs) they stay bitwise.
        def same(a, b):
            return torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        same = torch.equal

    full = run(slice(0, 45))
    for i in (0, 5, 16, 44):
        alone = run(slice(i, i + 1))
        for a, b, name in zip(alone[:3], full[:3], ("logp", "entropy", "d_hidden")):
            assert same(a, b[i : i + 1]), f"{name} of token {i} changed with the batch"
    # a sub-batch at an offset that moves every token to another place in its block
    part = run(slice(3, 30))
    for a, b, name in zip(part[:3], full[:3], ("logp", "entropy", "d_hidden")):
        assert same(a, b[3:30]), f"{name} changed between a batch of 27 and a batch of 45"


def _dot_is_row_invariant() -> bool:
    """Whether this platform's ``tl.dot`` (fp32 accumulation) gives a row the same bits wherever it sits in a
    16-row tile."""
    if torch.cuda.is_available():
        return True
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 32), dtype=np.float32), rng.standard_normal((32, 32), dtype=np.float32)
    first = (a @ b)[0]
    return all(np.array_equal(first, (np.roll(a, r, axis=0) @ b)[r]) for r in range(16))
    again = run(slice(0, 45))
    assert torch.equal(again[3], full[3]), "d_weight is not reproducible"


# ------------------------------------------------------------------------------------------------------------
# fused_linear_ppo_loss against fused_ppo_loss on materialised logits
# ------------------------------------------------------------------------------------------------------------
ROWS, STEPS = 4, 9  # 36 tokens

PPO_CASES = [
    dict(),
    dict(agg="token-sum", clip_high=0.28, bias=True),
    dict(agg="seq-mean-token-sum", dual_clip=3.0, temperature=0.8),
    dict(agg="seq-mean-token-mean", ref_logp=True, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01),
    dict(agg="seq-mean-token-sum-norm", ref_logp=True, kl_coef=0.2, kl_estimator="k2", loss_scale=16.0,
         per_seq_adv=True),
    dict(ref_logp=True, kl_coef=0.05, kl_estimator="k1", is_weights=True, num_tokens=50, bias=True,
         temperature=1.2, dual_clip=2.5, entropy_coef=0.02),
    dict(agg="seq-mean-token-mean", num_seqs=6, ref_logp=True, kl_coef=0.0),
]


def _ppo_inputs(case, dtype, seed=20):
    device = _device()
    hidden, weight, bias, labels = _inputs(n=ROWS * STEPS, dtype=dtype, bias=case.get("bias", False), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        logp0, _ = _oracle(hidden, weight, bias, labels, case.get("temperature", 1.0))
    # old / ref log-probs near the current ones so that some ratios clip and some do not
    old = (logp0 + 0.3 * torch.randn(logp0.shape, generator=g).to(device)).view(ROWS, STEPS)
    ref = (logp0 + 0.2 * torch.randn(logp0.shape, generator=g).to(device)).view(ROWS, STEPS)
    if case.get("per_seq_adv"):
        adv = torch.randn(ROWS, generator=g).to(device)
    else:
        adv = torch.randn(ROWS, STEPS, generator=g).to(device)
    mask = (torch.rand(ROWS, STEPS, generator=g) > 0.25).to(device)
    mask[0, :3] = True
    mask[2] = False  # a fully masked row
    isw = (0.5 + torch.rand(ROWS, STEPS, generator=g)).to(device)
    return hidden.view(ROWS, STEPS, -1), weight, bias, labels.view(ROWS, STEPS), old, ref, adv, mask, isw


@pytest.mark.parametrize("case", PPO_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fused_linear_ppo_loss_matches_materialised(case, backend, tol):
    backend("triton")
    dtype = torch.float32
    hidden, weight, bias, labels, old, ref, adv, mask, isw = _ppo_inputs(case, dtype)
    kwargs = {k: v for k, v in case.items() if k not in ("bias", "ref_logp", "is_weights", "per_seq_adv")}
    if case.get("ref_logp"):
        kwargs["ref_logp"] = ref
    if case.get("is_weights"):
        kwargs["is_weights"] = isw
    (h, w, b), (hr, wr, br) = _leaves(hidden, weight, bias, dtype)
    loss, stats = rlhf_fast.ops.fused_linear_ppo_loss(h, w, labels, old, adv, mask, bias=b, **kwargs)

    logits = hr @ wr.t()
    if br is not None:
        logits = logits + br
    loss_r, stats_r = reference.fused_ppo_loss(logits, labels, old, adv, mask, **kwargs)
    _close(loss, loss_r, dtype, tol, "loss")
    assert set(stats) == set(stats_r)
    for name in stats_r:
        _close(stats[name], stats_r[name], dtype, tol, f"stats[{name}]")
    if case.get("dual_clip"):
        assert "dual_clip_frac" in stats
    loss.backward()
    loss_r.backward()
    _close(h.grad, hr.grad, dtype, tol, "d_hidden")
    _close(w.grad, wr.grad, dtype, tol, "d_weight")
    if b is not None:
        _close(b.grad, br.grad, dtype, tol, "d_bias")


def test_fused_linear_ppo_loss_fp16(backend, tol):
    backend("triton")
    case = dict(ref_logp=True, kl_coef=0.1, entropy_coef=0.01, bias=True, temperature=0.9)
    hidden, weight, bias, labels, old, ref, adv, mask, _ = _ppo_inputs(case, torch.float16, seed=30)
    (h, w, b), (hr, wr, br) = _leaves(hidden, weight, bias, torch.float16)
    kwargs = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, temperature=0.9)
    loss, stats = rlhf_fast.ops.fused_linear_ppo_loss(h, w, labels, old, adv, mask, bias=b, **kwargs)
    loss_r, stats_r = reference.fused_ppo_loss(hr @ wr.t() + br, labels, old, adv, mask, **kwargs)
    _close(loss, loss_r, torch.float16, tol, "loss")
    for name in stats_r:
        _close(stats[name], stats_r[name], torch.float16, tol, f"stats[{name}]")
    loss.backward()
    loss_r.backward()
    for ours, ref_t, name in ((h, hr, "d_hidden"), (w, wr, "d_weight"), (b, br, "d_bias")):
        assert ours.grad.dtype == torch.float16
        _close(ours.grad, ref_t.grad, torch.float16, tol, name)


# ------------------------------------------------------------------------------------------------------------
# GPU: bf16 at realistic sizes
# ------------------------------------------------------------------------------------------------------------
def _rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_linear_logprobs_realistic(dtype, with_bias, tol):
    n, h_size, v = 2 * 2048 + 37, 1024, 32000 + 77
    hidden, weight, bias, labels = _inputs(n=n, h=h_size, v=v, dtype=dtype, bias=with_bias, seed=40)
    hidden = hidden * 2.0  # spread the logits a little
    (h, w, b), _ = _leaves(hidden, weight, bias, dtype)
    logp, ent = K.linear_logprobs(h, w, labels, bias=b, temperature=0.9, return_entropy=True)
    (hr, wr, br) = (t.detach().float().requires_grad_() if t is not None else None for t in (hidden, weight, bias))
    logp_r, ent_r = reference.linear_logprobs(hr, wr, labels, bias=br, temperature=0.9, return_entropy=True)
    # Exact products and fp32 sums on both sides: tight, although |logp| is ~50 here.
    torch.testing.assert_close(logp, logp_r, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(ent, ent_r, atol=1e-2, rtol=1e-3)
    g = torch.Generator(device="cuda").manual_seed(41)
    g_lp, g_ent = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)
    (logp * g_lp + ent * g_ent).sum().backward()
    (logp_r * g_lp + ent_r * g_ent).sum().backward()
    assert _rel_err(h.grad, hr.grad) < 2e-2
    assert _rel_err(w.grad, wr.grad) < 2e-2
    if with_bias:
        assert _rel_err(b.grad, br.grad) < 2e-2


@pytest.mark.gpu
def test_gpu_linear_logprobs_fp32(tol):
    """The fp32 tile configuration (64 x 64 tiles, exact "ieee" products) that only a GPU runs."""
    n, h_size, v = 300, 256, 5003
    hidden, weight, bias, labels = _inputs(n=n, h=h_size, v=v, bias=True, seed=45)
    (h, w, b), (hr, wr, br) = _leaves(hidden, weight, bias, torch.float32)
    logp, ent = K.linear_logprobs(h, w, labels, bias=b, temperature=1.1, return_entropy=True)
    logp_r, ent_r = _oracle(hr, wr, br, labels, 1.1)
    _close(logp, logp_r, torch.float32, tol, "logp")
    _close(ent, ent_r, torch.float32, tol, "entropy")
    g = torch.Generator(device="cuda").manual_seed(46)
    g_lp, g_ent = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)
    (logp * g_lp + ent * g_ent).sum().backward()
    (logp_r * g_lp + ent_r * g_ent).sum().backward()
    for ours, ref, name in ((h, hr, "d_hidden"), (w, wr, "d_weight"), (b, br, "d_bias")):
        assert _rel_err(ours.grad, ref.grad) < 1e-5, name


@pytest.mark.gpu
def test_gpu_batch_invariance_bf16():
    n, h_size, v = 1000, 512, 50000 + 3
    hidden, weight, bias, labels = _inputs(n=n, h=h_size, v=v, dtype=torch.bfloat16, bias=True, seed=42)

    def run(rows):
        h = hidden[rows].clone().requires_grad_()
        logp, ent = K.linear_logprobs(h, weight, labels[rows], bias=bias, return_entropy=True)
        (logp + 0.1 * ent).sum().backward()
        return logp, ent, h.grad

    full = run(slice(0, n))
    for rows in (slice(0, 1), slice(129, 130), slice(300, 777), slice(999, 1000)):
        for a, b in zip(run(rows), full):
            assert torch.equal(a, b[rows])


@pytest.mark.gpu
def test_gpu_fused_linear_ppo_loss_bf16(backend):
    backend("triton")
    rows, steps, h_size, v = 8, 300, 1024, 32000 + 77
    n = rows * steps
    hidden, weight, bias, labels = _inputs(n=n, h=h_size, v=v, dtype=torch.bfloat16, seed=43)
    g = torch.Generator(device="cuda").manual_seed(44)
    with torch.no_grad():
        logp0 = reference.linear_logprobs(hidden.float(), weight.float(), labels)
    old = (logp0 + 0.2 * torch.randn(n, device="cuda", generator=g)).view(rows, steps)
    ref = (logp0 + 0.2 * torch.randn(n, device="cuda", generator=g)).view(rows, steps)
    adv = torch.randn(rows, device="cuda", generator=g)
    mask = torch.rand(rows, steps, device="cuda", generator=g) > 0.2
    kwargs = dict(ref_logp=ref, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0, agg="seq-mean-token-mean")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = rlhf_fast.ops.fused_linear_ppo_loss(h.view(rows, steps, -1), w, labels.view(rows, steps), old,
                                                      adv, mask, **kwargs)
    hr, wr = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss_r, stats_r = reference.fused_linear_ppo_loss(hr.view(rows, steps, -1), wr, labels.view(rows, steps), old,
                                                      adv, mask, **kwargs)
    torch.testing.assert_close(loss, loss_r, atol=2e-2, rtol=2e-2)
    for name in stats_r:
        torch.testing.assert_close(stats[name], stats_r[name], atol=2e-2, rtol=2e-2)
    loss.backward()
    loss_r.backward()
    assert _rel_err(h.grad, hr.grad) < 2e-2
    assert _rel_err(w.grad, wr.grad) < 2e-2
