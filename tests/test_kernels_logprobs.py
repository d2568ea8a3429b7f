"""Triton selective_log_softmax / logprobs_and_entropy against the reference, forward and backward.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest); the vocabulary chunk is lowered to 64 so that
V = 300 spans five chunks, the last one partial. bf16 runs only on the GPU (the interpreter's bf16 is unreliable).
"""

import pytest
import torch
from _sm90 import compile_for_sm90

from rlhf_fast import _dispatch, ops
from rlhf_fast import reference as ref

V = 300


@pytest.fixture(autouse=True)
def triton_backend(triton_small_chunks):
    """Every test here runs the Triton kernels (interpreter on CPU, small vocabulary chunks)."""


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, vocab=V, dtype=torch.float32, scale=3.0, seed=0, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    flat[0], flat[-1] = 0, vocab - 1  # both ends of the vocabulary
    return logits.to(_device()), labels.to(dtype=label_dtype, device=_device())


def _run(op, logits, labels, temperature, grads):
    """Forward and backward of one implementation; returns (outputs, grad of logits)."""
    x = logits.detach().clone().requires_grad_(True)
    out = op(x, labels, temperature=temperature)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, grads[: len(out)])
    return [o.detach() for o in out], x.grad


OPS = {
    "selective_log_softmax": (ops.selective_log_softmax, ref.selective_log_softmax),
    "logprobs_and_entropy": (ops.logprobs_and_entropy, ref.logprobs_and_entropy),
}


def test_dispatch_picks_the_triton_kernels():
    from rlhf_fast.kernels import logprobs

    for name in OPS:
        assert _dispatch.resolve(name, torch.device(_device())) is logprobs.KERNELS[name]


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_match_reference(name, dtype, temperature, tol):
    kernel, oracle = OPS[name]
    logits, labels = _inputs((3, 7), dtype=dtype, seed=1)
    grads = [torch.randn(3, 7, device=_device()) for _ in range(2)]
    out, grad = _run(kernel, logits, labels, temperature, grads)
    # The oracle sees the very same values in float32, so forward differences are only summation order.
    flat_grads = [g.view(-1) for g in grads]
    ref_out, ref_grad = _run(oracle, logits.float().view(-1, V), labels.view(-1), temperature, flat_grads)
    for o, r in zip(out, ref_out):
        assert o.dtype == torch.float32 and o.shape == (3, 7)
        torch.testing.assert_close(o.view(-1), r, atol=2e-5, rtol=1e-5)
    assert grad.dtype == dtype and grad.shape == logits.shape
    atol, rtol = tol(dtype)
    torch.testing.assert_close(grad.float().view(-1, V), ref_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_int32_labels_and_single_chunk_vocab(label_dtype):
    logits, labels = _inputs((5,), vocab=37, seed=2, label_dtype=label_dtype)
    grads = [torch.randn(5, device=_device()) for _ in range(2)]
    out, grad = _run(ops.logprobs_and_entropy, logits, labels, 1.3, grads)
    ref_out, ref_grad = _run(ref.logprobs_and_entropy, logits, labels.long(), 1.3, grads)
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_large_logits():
    logits, labels = _inputs((6,), seed=3, scale=1.0)
    logits = torch.where(logits > 0, torch.full_like(logits, 1e4), torch.full_like(logits, -1e4)) + logits
    grads = [torch.randn(6, device=_device()) for _ in range(2)]
    out, grad = _run(ops.logprobs_and_entropy, logits, labels, 1.0, grads)
    ref_out, ref_grad = _run(ref.logprobs_and_entropy, logits, labels, 1.0, grads)
    assert all(torch.isfinite(o).all() for o in out) and torch.isfinite(grad).all()
    # |z| ~ 1e4 has a float32 spacing of ~1e-3: both sides round at that level.
    torch.testing.assert_close(out[0], ref_out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref_out[1], atol=5e-3, rtol=1e-4)
    # The kernel's entropy is accumulated relative to the running max: tight against a float64 oracle.
    z = logits.double()
    ent64 = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(out[1].double(), ent64, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=5e-3, rtol=1e-4)


def test_minus_inf_logits_give_finite_entropy():
    logits, labels = _inputs((4,), seed=4)
    logits[:, 1::3] = float("-inf")
    labels[:] = 0  # a finite logit
    x = logits.clone().requires_grad_(True)
    logp, ent = ops.logprobs_and_entropy(x, labels)
    z = logits.float()
    p = torch.softmax(z, -1)
    torch.testing.assert_close(logp, torch.log_softmax(z, -1)[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, torch.special.entr(p).sum(-1), atol=1e-5, rtol=1e-5)
    ent.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, 1::3] == 0).all()


def test_one_output_used_and_zero_upstream_rows():
    logits, labels = _inputs((8,), seed=5)
    g = torch.randn(8, device=_device())
    g[2:5] = 0.0  # rows whose gradient is exactly 0 take the no-read path
    for which in (0, 1):
        x, xr = (logits.clone().requires_grad_(True) for _ in range(2))
        out = ops.logprobs_and_entropy(x, labels)[which]
        ref_out = ref.logprobs_and_entropy(xr, labels)[which]
        (out * g).sum().backward()
        (ref_out * g).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
        assert (x.grad[2:5] == 0).all()


def test_no_grad_fast_path_is_bitwise_the_grad_path():
    logits, labels = _inputs((2, 9), seed=6)
    with torch.no_grad():
        fast = ops.logprobs_and_entropy(logits, labels, temperature=0.9)
        fast_logp = ops.selective_log_softmax(logits, labels, temperature=0.9)
    x = logits.clone().requires_grad_(True)
    slow = ops.logprobs_and_entropy(x, labels, temperature=0.9)
    assert all(torch.equal(a, b.detach()) for a, b in zip(fast, slow))
    assert torch.equal(fast_logp, fast[0])
    assert torch.equal(logits, x.detach())


def test_non_contiguous_logits():
    logits, labels = _inputs((3, 6), seed=7)
    sliced = logits[:, :-1]  # the usual "drop the last position" view
    logp = ops.selective_log_softmax(sliced, labels[:, :-1])
    torch.testing.assert_close(
        logp, ref.selective_log_softmax(sliced.reshape(-1, V), labels[:, :-1].reshape(-1)).view(3, 5),
        atol=1e-5, rtol=1e-5,
    )
    strided = logits.reshape(-1, V).t().contiguous().t()  # last dimension not contiguous
    torch.testing.assert_close(
        ops.selective_log_softmax(strided, labels.view(-1)),
        ref.selective_log_softmax(strided, labels.view(-1)), atol=1e-5, rtol=1e-5,
    )


def test_empty_batch():
    logits = torch.randn(0, V, device=_device(), requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=_device())
    logp, ent = ops.logprobs_and_entropy(logits, labels)
    assert logp.shape == (0,) and ent.shape == (0,)


def test_batch_invariance_bitwise():
    logits, labels = _inputs((24,), seed=8, dtype=torch.float16)
    grads = [torch.randn(24, device=_device()) for _ in range(2)]
    full, full_grad = _run(ops.logprobs_and_entropy, logits, labels, 0.7, grads)
    for start, stop in [(0, 1), (5, 6), (9, 20)]:
        part, part_grad = _run(
            ops.logprobs_and_entropy, logits[start:stop], labels[start:stop], 0.7, [g[start:stop] for g in grads]
        )
        for a, b in zip(full, part):
            assert torch.equal(a[start:stop], b)
        assert torch.equal(full_grad[start:stop], part_grad)
    again, again_grad = _run(ops.logprobs_and_entropy, logits, labels, 0.7, grads)
    assert all(torch.equal(a, b) for a, b in zip(full, again)) and torch.equal(full_grad, again_grad)


# ---- GPU: bf16 at realistic sizes ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OPS))
def test_gpu_bf16_realistic(name, tol):
    kernel, oracle = OPS[name]
    torch.manual_seed(0)
    vocab = 151936
    logits = (torch.randn(512, vocab, device="cuda") * 2).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (512,), device="cuda")
    grads = [torch.randn(512, device="cuda") for _ in range(2)]
    out, grad = _run(kernel, logits, labels, 0.9, grads)
    ref_out, ref_grad = _run(oracle, logits.float(), labels, 0.9, grads)
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, atol=1e-3, rtol=1e-4)  # same bf16 values, fp32 math on both sides
    # The bf16 gradient is the fp32 one rounded: 1e-2 relative (tol(bf16)'s atol of 6e-2 would pass a p that is
    # 10% off, since most entries are ~1e-6).
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), ref_grad, atol=1e-5, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_bf16_batch_invariance():
    torch.manual_seed(1)
    logits = torch.randn(300, 151936, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 151936, (300,), device="cuda")
    with torch.no_grad():
        full = ops.logprobs_and_entropy(logits, labels)
        part = ops.logprobs_and_entropy(logits[100:101], labels[100:101])
    assert all(torch.equal(a[100:101], b) for a, b in zip(full, part))


@pytest.mark.gpu
def test_gpu_bf16_gradient_batch_invariance():
    """A row's logits gradient (log-prob and entropy upstream) does not depend on the rest of the batch."""
    torch.manual_seed(2)
    vocab = 151936
    logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16) * 3
    labels = torch.randint(0, vocab, (64,), device="cuda")
    g_lp, g_ent = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")

    def grad(rows):
        x = logits[rows].clone().requires_grad_(True)
        logp, ent = ops.logprobs_and_entropy(x, labels[rows])
        (logp * g_lp[rows] + ent * g_ent[rows]).sum().backward()
        return x.grad

    full = grad(slice(0, 64))
    for r in (0, 17, 63):
        assert torch.equal(full[r:r + 1], grad(slice(r, r + 1)))


# ---- the real compiler: lower every kernel to sm_90 machine code without a GPU ---------------------------------

COMPILE_SCRIPT = """
    from rlhf_fast.kernels import logprobs as P

    fwd = {"X": "*bf16", "stride_xr": "i64", "stride_xt": "i64", "LABELS": "*i64", "LOGP": "*fp32", "ENT": "*fp32", "LSE": "*fp32",
           "inv_t": "fp32"}
    ptx = compile_one(P._logprobs_fwd_kernel, fwd, {"HAS_TEMP": True, "WITH_ENTROPY": True, "STORE_LSE": True,
                      "BLOCK_V": 2048}, div=("X", "stride_xr", "stride_xt", "V"), num_warps=1, num_stages=2).asm["ptx"]
    assert "ld.global.v4" in ptx, "the logits loads are not vectorised"
    compile_one(P._logprobs_fwd_kernel, dict(fwd, X="*fp16", LABELS="*i32", inv_t="fp64"),
                {"HAS_TEMP": False, "WITH_ENTROPY": False, "STORE_LSE": False, "BLOCK_V": 4096}, num_warps=4)
    bwd = {n: "*fp32" for n in ("LSE", "ENT", "G_LOGP", "G_ENT", "ROW_SCALE", "SCALE")}
    bwd.update({"X": "*bf16", "DX": "*bf16", "LABELS": "*i64", "inv_t": "fp32"})
    ptx = compile_one(P._logits_grad_kernel, bwd, {"HAS_TEMP": True, "HAS_LOGP_GRAD": True, "HAS_ENT_GRAD": True,
                      "HAS_ROW_SCALE": False, "HAS_SCALE": True, "BLOCK_V": 4096},
                      div=("X", "DX", "stride_xr", "stride_xt", "stride_dr", "stride_dt", "V"), num_warps=16).asm["ptx"]
    assert "st.global.v4" in ptx, "the gradient stores are not vectorised"
    compile_one(P._logits_grad_kernel, dict(bwd, X="*fp32", DX="*fp32", LABELS="*i32", inv_t="fp64"),
                {"HAS_TEMP": False, "HAS_LOGP_GRAD": True, "HAS_ENT_GRAD": False, "HAS_ROW_SCALE": False,
                 "HAS_SCALE": False, "BLOCK_V": 1024}, num_warps=4)
    compile_one(P._scale_rows_kernel, {"X": "*bf16", "SCALE": "*fp32"}, {"BLOCK_V": 4096}, num_warps=16)
    print("compiled")
    """


def test_kernels_compile_for_sm90():
    compile_for_sm90(COMPILE_SCRIPT)
