"""The chunked reference for log-probs from hidden states keeps its memory bound: at most two [chunk, V] float32
tensors alive at once, in the forward and in the backward (allocations read from the profiler)."""
import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.bench.harness import cpu_peak_extra_mib

MIB = 2**20


@pytest.mark.parametrize("with_entropy", [False, True])
def test_linear_logprobs_holds_at_most_two_chunks_of_logits(with_entropy):
    n, h, v, chunk = 512, 32, 4096, 128
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))
    chunk_mib = chunk * v * 4 / MIB  # 2 MiB; the whole [N, V] logits would be 8 MiB

    def step():
        logp, entropy = reference.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=chunk)
        loss = logp.sum() + (entropy.sum() if with_entropy else 0.0)
        return torch.autograd.grad(loss, (hidden, weight))

    step()
    peak = cpu_peak_extra_mib(step)
    if peak is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    small = (2 * n * h + 2 * v * h + 8 * n) * 4 / MIB  # gradients, their float32 accumulators, per-token vectors
    assert peak <= 2 * chunk_mib + small + 0.25, f"peak {peak:.2f} MiB, chunk {chunk_mib:.2f} MiB"
