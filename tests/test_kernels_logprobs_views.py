"""Sliced logits views (``logits[:, :-1]``, the shape every trainer hands over) go to the log-prob kernels with
their strides instead of a flattening copy, and give the reference's values and gradients."""
import pytest
import torch

from rlhf_fast import ops


def both_backends(backend, fn):
    backend("torch")
    want = fn()
    backend("triton")
    return want, fn()


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sliced_time_view_matches_reference(backend, temperature, monkeypatch):
    from rlhf_fast.kernels import logprobs as kernel

    monkeypatch.setattr(kernel, "MAX_BLOCK_V", 64)  # V = 150 spans three chunks
    torch.manual_seed(0)
    base = torch.randn(3, 6, 150)
    labels = torch.randint(0, 150, (3, 5))
    upstream = (torch.randn(3, 5), torch.randn(3, 5))

    def run():
        leaf = base.clone().requires_grad_()
        logits = (leaf * 1.0)[:, :-1]  # non-contiguous: rows of 6 positions, 5 used
        assert not logits.is_contiguous()
        logp, entropy = ops.logprobs_and_entropy(logits, labels, temperature=temperature)
        torch.autograd.backward((logp, entropy), upstream)
        no_grad = ops.selective_log_softmax(base[:, :-1], labels, temperature=temperature)
        return logp.detach(), entropy.detach(), no_grad, leaf.grad

    want, got = both_backends(backend, run)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[3][:, -1], torch.zeros(3, 150))  # the sliced-off position gets no gradient


def test_permuted_time_major_view(backend):
    torch.manual_seed(1)
    time_major = torch.randn(4, 2, 37)  # [T, B, V] storage, read as [B, T, V]
    logits = time_major.transpose(0, 1)
    labels = torch.randint(0, 37, (2, 4))
    want, got = both_backends(backend, lambda: ops.selective_log_softmax(logits, labels))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sliced_view_reaches_the_kernel_without_a_copy(backend, monkeypatch):
    from rlhf_fast.kernels import logprobs as kernel

    seen = []
    original = kernel.logprobs_forward

    def spy(logits, *args, **kwargs):
        seen.append(logits.data_ptr())
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(kernel, "logprobs_forward", spy)
    backend("triton")
    base = torch.randn(2, 5, 33)
    ops.selective_log_softmax(base[:, :-1], torch.randint(0, 33, (2, 4)))
    assert seen == [base.data_ptr()]
