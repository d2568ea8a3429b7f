"""Per-row ops give bitwise-identical rows whatever else is in the batch (reference backend)."""
import pytest
import torch

from rlhf_fast import ops


@pytest.fixture(autouse=True)
def reference_backend(backend):
    backend("torch")


def test_logprobs_and_entropy_rows_bitwise():
    torch.manual_seed(0)
    logits, labels = torch.randn(33, 257, dtype=torch.float16), torch.randint(0, 257, (33,))
    full = ops.logprobs_and_entropy(logits, labels, temperature=0.7)
    for start, stop in [(0, 1), (5, 6), (10, 31)]:
        part = ops.logprobs_and_entropy(logits[start:stop], labels[start:stop], temperature=0.7)
        for a, b in zip(full, part):
            assert torch.equal(a[start:stop], b)
    again = ops.logprobs_and_entropy(logits, labels, temperature=0.7)
    assert all(torch.equal(a, b) for a, b in zip(full, again))


def test_token_kl_rows_bitwise():
    torch.manual_seed(1)
    logp, ref = torch.randn(9, 13), torch.randn(9, 13)
    full = ops.token_kl(logp, ref)
    assert torch.equal(full[4:5], ops.token_kl(logp[4:5], ref[4:5]))


# The reference linear_logprobs is not in this list: CPU BLAS picks a different GEMM for one row than for
# many, so its rows differ in the last bit. The Triton kernel is held to bitwise invariance instead.
