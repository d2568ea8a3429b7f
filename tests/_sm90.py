"""Ahead-of-time compilation of Triton kernels to H100 (sm_90) machine code, without a GPU.

The interpreter runs kernels as numpy and accepts code the real compiler rejects (types of loop-carried values,
fp64 scalar arguments, int1 pointers), so each kernel family also lowers through ``triton.compile`` and the
bundled ptxas. Scripts run in a subprocess with TRITON_INTERPRET unset; they get ``triton``, ``target`` and
``compile_one(fn, types, consts, div=(), **options)`` (returns the compiled kernel; ``div`` marks arguments
divisible by 16, as the launcher would) and must print ``compiled`` at the end.
"""
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)

    def compile_one(fn, types, consts, div=(), **options):
        signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=target, options=options)
    """
)


def compile_for_sm90(script: str, timeout: int = 300) -> str:
    """Run ``PRELUDE + script`` in a clean subprocess; skip without the bundled ptxas; return its stdout."""
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = PRELUDE + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
    return proc.stdout
