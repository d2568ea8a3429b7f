"""The GAE / whiten / KL / loss kernels lower through the real Triton compiler to sm_90 machine code, without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (types of loop-carried values, scalar
arguments that Inductor passes as fp64, int1 mask pointers). This compiles each kernel ahead of time for an H100
target with the bundled ptxas, in a subprocess where TRITON_INTERPRET is unset. The loss kernels must also compile
without register spills (a per-thread stack of 0).
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
    # The three loss launches, with the sm_90 stack size (register spills) ptxas gives each: it must be 0.
    import os, re, subprocess, tempfile
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def no_spills(fn, types, consts, **options):
        k = compile_one(fn, types, consts, **options)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        stack = re.search(r"STACK:(\d+)", usage)
        assert stack, usage
        assert int(stack.group(1)) == 0, (fn.__name__, consts, usage)

    ptrs = {n: "*fp32" for n in L._policy_fwd_kernel.arg_names if n.endswith("_ptr")}
    ptrs.update({"logp_ptr": "*bf16", "adv_ptr": "*fp16", "mask_ptr": "*i1",
                 "clip_low": "fp64", "clip_high": "fp32", "dual_clip": "fp32"})
    no_spills(L._policy_fwd_kernel, ptrs, {"HAS_DUAL": True, "HAS_ISW": True, "STORE_GRAD": True,
                                           "BLOCK_R": 1, "BLOCK_T": 1024})
    no_spills(L._policy_fwd_kernel, dict(ptrs, mask_ptr="*u8"), {"HAS_DUAL": False, "HAS_ISW": False,
                                                                 "STORE_GRAD": False, "BLOCK_R": 16, "BLOCK_T": 64})
    vptrs = {n: "*fp32" for n in L._value_fwd_kernel.arg_names if n.endswith("_ptr")}
    vptrs.update({"v_ptr": "*bf16", "mask_ptr": "*i1", "clip": "fp64"})
    no_spills(L._value_fwd_kernel, vptrs, {"HAS_CLIP": True, "STORE_GRAD": True, "BLOCK_R": 1, "BLOCK_T": 1024})
    fin = {"work_ptr": "*fp32", "out_ptr": "*fp32", "num_tokens": "fp64", "num_seqs": "fp32", "loss_scale": "fp32"}
    for agg in L.AGG_CODES.values():
        no_spills(L._finalize_kernel, fin, {"AGG": agg, "NSTAT": L.POLICY_STATS, "BLOCK_R": 512, "BLOCK_G": 2,
                                            "BLOCK_P": L.STAT_BLOCK})
    no_spills(L._finalize_kernel, fin, {"AGG": 3, "NSTAT": L.VALUE_STATS, "BLOCK_R": 1024, "BLOCK_G": 1,
                                        "BLOCK_P": L.STAT_BLOCK})
    no_spills(L._backward_kernel, {"gfac_ptr": "*fp32", "f_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*bf16"},
              {"BLOCK_R": 1, "BLOCK_T": 1024})
    no_spills(L._backward_kernel, {"gfac_ptr": "*fp32", "f_ptr": "*fp32", "g_ptr": "*bf16", "out_ptr": "*fp32"},
              {"BLOCK_R": 16, "BLOCK_T": 64})
    print("compiled")
    """


def test_kernels_compile_for_sm90():
    compile_for_sm90(SCRIPT)
