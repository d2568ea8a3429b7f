"""Chooses, per call, which implementation of an op runs.

CUDA tensors with Triton importable -> the Triton kernel; CPU tensors -> the reference (or the C++ path where
one exists). ``RLHF_FAST_BACKEND=torch|triton`` overrides; with ``TRITON_INTERPRET=1`` the ``triton`` backend
runs the kernels on CPU tensors, which is how CI checks the real kernel code. An op with no kernel yet falls
back to the reference and says so once.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("rlhf_fast")

BACKENDS = ("torch", "triton")


def requested_backend() -> str | None:
    value = os.environ.get("RLHF_FAST_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"RLHF_FAST_BACKEND: expected one of {list(BACKENDS)} or unset, got {value!r}")
    return value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


@functools.lru_cache(maxsize=None)
def native_module():
    """rlhf_fast._C when it was built, else None."""
    try:
        return importlib.import_module("rlhf_fast._C")
    except ImportError:
        return None


def select_backend(device: torch.device) -> str:
    forced = requested_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("RLHF_FAST_BACKEND=triton: triton is not importable")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"RLHF_FAST_BACKEND=triton: expected CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
                f"got tensors on {device}"
            )
        return "triton"
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


@functools.lru_cache(maxsize=None)
def _warn_missing_kernel(name: str) -> None:
    logger.warning("rlhf_fast: no Triton kernel for %s yet; using the PyTorch reference", name)


def resolve(name: str, device: torch.device) -> Callable:
    """The implementation of op ``name`` for tensors on ``device``."""
    from . import reference

    if select_backend(device) == "triton":
        from .kernels import KERNELS

        kernel = KERNELS.get(name)
        if kernel is not None:
            return on_device(kernel, device)
        _warn_missing_kernel(name)
    return getattr(reference, name)


def on_device(kernel: Callable, device: torch.device) -> Callable:
    """``kernel`` run with ``device`` as the current CUDA device when it is not already.

    Triton launches on the current device: tensors on ``cuda:1`` while ``cuda:0`` is current would be read from
    the wrong GPU (an illegal address). The autograd engine runs each backward on its tensors' device already.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return kernel

    @functools.wraps(kernel)
    def guarded(*args, **kwargs):
        with torch.cuda.device(device):
            return kernel(*args, **kwargs)

    return guarded
