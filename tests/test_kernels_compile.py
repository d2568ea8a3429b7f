"""The GAE / whiten / KL / loss kernels lower through the real Triton compiler to sm_90 machine code, without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (types of loop-carried values, scalar
arguments that Inductor passes as fp64, int1 mask pointers). This compiles each kernel ahead of time for an H100
target with the bundled ptxas, in a subprocess where TRITON_INTERPRET is unset.
"""

from _sm90 import compile_for_sm90

SCRIPT = """
    from rlhf_fast.kernels import advantages as A, kl as K, losses as L

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


def test_kernels_compile_for_sm90():
    compile_for_sm90(SCRIPT)
