"""The GAE / whiten / KL / loss kernels lower through the real Triton compiler to sm_90 machine code, without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (types of loop-carried values, scalar
arguments that Inductor passes as fp64, int1 mask pointers). This compiles each kernel ahead of time for an H100
target with the bundled ptxas, in a subprocess where TRITON_INTERPRET is unset.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rlhf_fast.kernels import advantages as A, kl as K, losses as L

    target = GPUTarget("cuda", 90, 32)

    def compile_one(fn, types, consts, **options):
        signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target, options=options)

    compile_one(A._gae_kernel, {"r_ptr": "*bf16", "v_ptr": "*fp16", "m_ptr": "*u8", "adv_ptr": "*fp32",
                                "ret_ptr": "*fp32", "gamma": "fp64", "gamma_lam": "fp32"}, {"CHUNK": 1024}, num_warps=4)
    compile_one(A._whiten_partial_kernel, {"x_ptr": "*bf16", "m_ptr": "*i1", "part_ptr": "*fp32"}, {"BLOCK": 4096})
    compile_one(A._whiten_finalize_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "eps": "fp64"}, {"BLOCK": 1024})
    compile_one(A._whiten_apply_kernel, {"x_ptr": "*fp32", "m_ptr": "*i64", "stat_ptr": "*fp32", "y_ptr": "*fp32"},
                {"SHIFT_MEAN": False, "BLOCK": 4096})
    compile_one(K._kl_fwd_kernel, {"logp_ptr": "*bf16", "ref_ptr": "*fp32", "out_ptr": "*fp32"},
                {"ESTIMATOR": 3, "BLOCK": 1024})
    compile_one(K._kl_bwd_kernel, {"grad_out_ptr": "*fp32", "logp_ptr": "*bf16", "ref_ptr": "*fp16",
                                   "grad_logp_ptr": "*bf16", "grad_ref_ptr": "*fp16"},
                {"ESTIMATOR": 2, "HAS_LOGP_GRAD": True, "HAS_REF_GRAD": True, "BLOCK": 1024})
    ptrs = {n: "*fp32" for n in L._policy_fwd_kernel.arg_names if n.endswith("_ptr")}
    ptrs.update({"logp_ptr": "*bf16", "adv_ptr": "*fp16", "mask_ptr": "*u8",
                 "clip_low": "fp64", "clip_high": "fp32", "dual_clip": "fp32"})
    compile_one(L._policy_fwd_kernel, ptrs, {"HAS_DUAL": True, "HAS_ISW": True, "STORE_GRAD": True,
                                             "BLOCK_R": 1, "BLOCK_T": 1024})
    compile_one(L._policy_fwd_kernel, ptrs, {"HAS_DUAL": False, "HAS_ISW": False, "STORE_GRAD": False,
                                             "BLOCK_R": 16, "BLOCK_T": 64})
    vptrs = {n: "*fp32" for n in L._value_fwd_kernel.arg_names if n.endswith("_ptr")}
    vptrs.update({"v_ptr": "*bf16", "mask_ptr": "*i1", "clip": "fp64"})
    compile_one(L._value_fwd_kernel, vptrs, {"HAS_CLIP": True, "STORE_GRAD": True, "BLOCK_R": 1, "BLOCK_T": 1024})
    compile_one(L._finalize_kernel, {"partial_ptr": "*fp32", "out_ptr": "*fp32"}, {"NSTAT": 8, "BLOCK": 256})
    compile_one(L._scale_kernel, {"gfac_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*bf16"}, {"BLOCK": 1024})
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
