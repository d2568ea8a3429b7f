"""Shared test setup: interpreter mode on CPU-only machines, the `gpu` marker, per-dtype tolerances."""
import os

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter; triton reads this when kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (atol, rtol) of a low-precision or fp32 kernel against the float32 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tol():
    def lookup(dtype):
        return TOLERANCES[dtype]

    return lookup


@pytest.fixture
def backend(monkeypatch):
    """Set RLHF_FAST_BACKEND for one test."""

    def use(name):
        monkeypatch.setenv("RLHF_FAST_BACKEND", name)

    return use


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and CI machines are shared (trainer test modules opt in)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    """The demo's shipped tokenizer."""
    from rlhf_fast.demo.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def triton_small_chunks(backend, monkeypatch):
    """The Triton backend; on CPU (interpreter) the log-prob kernels' vocabulary chunk drops to 64, so that small
    vocabularies still span several chunks, the last one partial."""
    backend("triton")
    from rlhf_fast.kernels import logprobs

    if not HAS_CUDA:
        monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 64)


@pytest.fixture
def count_launches(monkeypatch):
    """``(launches, state)``: every Triton launch by kernel name; set ``state["record"]`` to a
    ``_host_work.RecordAten`` to pause its recording during launches."""
    from _host_work import install_launch_counter

    return install_launch_counter(monkeypatch)
