"""The benchmark harness's CPU peak-memory reading against allocations of known size."""
import pytest
import torch

from rlhf_fast.bench.harness import cpu_peak_extra_mib

MIB = 2**20


def test_cpu_peak_counts_tensors_alive_together_not_in_sequence():
    def one_at_a_time():
        for _ in range(4):
            block = torch.empty(8 * MIB, dtype=torch.uint8)
            block.fill_(1)
            del block

    def all_at_once():
        blocks = [torch.empty(8 * MIB, dtype=torch.uint8) for _ in range(4)]
        return sum(int(b.numel()) for b in blocks)

    sequential, together = cpu_peak_extra_mib(one_at_a_time), cpu_peak_extra_mib(all_at_once)
    if sequential is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    assert 8 <= sequential < 9
    assert 32 <= together < 33


def test_cpu_peak_ignores_memory_held_before_the_call():
    held = torch.ones(4 * MIB)  # 16 MiB of float32, summed without a temporary copy
    peak = cpu_peak_extra_mib(lambda: held.sum())
    assert peak is not None and peak < 1
