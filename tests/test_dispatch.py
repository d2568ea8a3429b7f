"""Backend selection: CPU -> reference, RLHF_FAST_BACKEND overrides, missing kernels fall back."""
import logging

import pytest
import torch

from rlhf_fast import _dispatch, ops, reference


def test_cpu_defaults_to_reference(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    assert _dispatch.select_backend(torch.device("cpu")) == "torch"
    assert _dispatch.resolve("token_kl", torch.device("cpu")) is reference.token_kl


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"RLHF_FAST_BACKEND: expected one of \['torch', 'triton'\].*got 'cuda'"):
        ops.token_kl(torch.zeros(2), torch.zeros(2))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match=r"expected CUDA tensors \(or TRITON_INTERPRET=1 for CPU\), got tensors on cpu"):
        _dispatch.select_backend(torch.device("cpu"))


def test_missing_kernel_falls_back_once_with_a_log(monkeypatch, caplog):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from rlhf_fast import kernels

    monkeypatch.delitem(kernels.KERNELS, "an_op_without_kernel", raising=False)
    monkeypatch.setattr(reference, "an_op_without_kernel", lambda: "reference", raising=False)
    _dispatch._warn_missing_kernel.cache_clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_fast"):
        assert _dispatch.resolve("an_op_without_kernel", torch.device("cpu"))() == "reference"
        _dispatch.resolve("an_op_without_kernel", torch.device("cpu"))
    assert sum("an_op_without_kernel" in r.message for r in caplog.records) == 1


def test_kernels_run_with_their_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: a kernel for tensors on another GPU runs inside a device guard;
    on the current device (or CPU) it is returned as it is, with no guard to pay for."""
    import contextlib

    from rlhf_fast._dispatch import on_device

    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)

    def kernel(x, *, scale):
        return x * scale

    assert on_device(kernel, torch.device("cpu")) is kernel
    assert on_device(kernel, torch.device("cuda", 0)) is kernel
    guarded = on_device(kernel, torch.device("cuda", 1))
    assert guarded is not kernel and guarded(3, scale=2) == 6
    assert entered == [torch.device("cuda", 1)]
