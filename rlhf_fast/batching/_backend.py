"""Which path runs a batcher call: the C++ module rlhf_fast._C, or the pure-Python fallback.

``backend=None`` (the default) takes C++ when the extension was built, unless ``RLHF_FAST_BACKEND=torch``
asks for the reference paths everywhere. ``backend="python"`` or ``"cpp"`` forces one; ``"cpp"`` without the
extension is an error rather than a silent fallback.
"""
from __future__ import annotations

from .._dispatch import native_module, requested_backend

BACKENDS = ("python", "cpp")


def native_batcher():
    """rlhf_fast._C when it was built with the batcher, else None."""
    module = native_module()
    if module is None or not hasattr(module, "batcher_partition"):
        return None
    return module


def choose(backend):
    """The C++ module to call, or None for the Python fallback."""
    if backend is None:
        if requested_backend() == "torch":
            return None
        return native_batcher()
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} or None, got {backend!r}")
    if backend == "python":
        return None
    module = native_batcher()
    if module is None:
        raise RuntimeError("backend='cpp': rlhf_fast._C was not built with the batcher (see setup.py)")
    return module
