"""The GAE / whiten / KL / loss kernels lower through the real Triton compiler to sm_90 machine code, without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (types of loop-carried values, scalar
arguments that Inductor passes as fp64, int1 mask pointers). This compiles each kernel ahead of time for an H100
target with the bundled ptxas, in a subprocess where TRITON_INTERPRET is unset. The loss kernels (and the fused PPO
loss's statistics, finalize and gradient kernels) must also compile without register spills (a per-thread stack of 0).
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
    fin = {"work_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "num_tokens": "fp64", "num_seqs": "fp32",
           "loss_scale": "fp32"}
    for agg in L.AGG_CODES.values():
        no_spills(L._finalize_kernel, fin, {"AGG": agg, "NSTAT": L.POLICY_STATS, "BLOCK_R": 512, "BLOCK_G": 2,
                                            "BLOCK_P": L.STAT_BLOCK})
    no_spills(L._finalize_kernel, fin, {"AGG": 3, "NSTAT": L.VALUE_STATS, "BLOCK_R": 1024, "BLOCK_G": 1,
                                        "BLOCK_P": L.STAT_BLOCK})
    no_spills(L._backward_kernel, {"gfac_ptr": "*fp32", "f_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*bf16"},
              {"BLOCK_R": 1, "BLOCK_T": 1024})
    no_spills(L._backward_kernel, {"gfac_ptr": "*fp32", "f_ptr": "*fp32", "g_ptr": "*bf16", "out_ptr": "*fp32"},
              {"BLOCK_R": 16, "BLOCK_T": 64})

    # The fused PPO loss from logits: statistics pass, the shared finalize (6 statistics, one partial per token,
    # its own step sizes and warps) and the gradient pass with the per-row factor f_r.
    from rlhf_fast.kernels import fused_loss as F, logprobs as P

    fwd = {n: "*fp32" for n in F._ppo_fwd_kernel.arg_names if n.isupper() and n not in ("R", "T", "V")}
    fwd.update({"X": "*bf16", "LABELS": "*i64", "OLD": "*bf16", "ADV": "*fp16", "M": "*i1"})
    fwd.update({n: "i64" for n in F._ppo_fwd_kernel.arg_names if n.startswith("stride_")})
    fwd.update({k: "fp32" for k in ("inv_t", "clip_low", "clip_high", "dual_clip", "kl_coef", "ent_coef")})
    everything = {"HAS_TEMP": True, "HAS_REF": True, "KL_IN_LOSS": True, "KL_EST": 3, "HAS_ISW": True,
                  "HAS_DUAL": True, "ENT_IN_LOSS": True, "NEED_GRAD": True, "BLOCK_V": 2048}
    no_spills(F._ppo_fwd_kernel, fwd, everything, num_warps=1, num_stages=2)
    no_spills(F._ppo_fwd_kernel, fwd, dict(everything, SEQ=True), num_warps=1, num_stages=2)  # GSPO's first pass
    # GSPO's row kernel (kernels/sequence_ratio.py), alone (ppo_policy_loss) and accumulating (fused_ppo_loss)
    from rlhf_fast.kernels import sequence_ratio as S

    seq = {n: "*fp32" for n in S.sequence_policy_kernel.arg_names if n.isupper() and n not in ("R", "T")}
    seq.update({n: "i64" for n in S.sequence_policy_kernel.arg_names if n.startswith("s_")})
    seq.update({"LOGP": "*bf16", "ADV": "*fp16", "M": "*i1", "clip_low": "fp64", "clip_high": "fp32",
                "dual_clip": "fp32"})
    row = {"HAS_DUAL": True, "HAS_ISW": True, "STORE_GRAD": True, "ACCUMULATE": False, "CLIP_SLOT": 0,
           "RATIO_SLOT": 2, "DUAL_SLOT": 3, "APPROX_SLOT": 1, "BLOCK_T": S.ROW_BLOCK}
    no_spills(S.sequence_policy_kernel, seq, row)
    no_spills(S.sequence_policy_kernel, dict(seq, LOGP="*fp32", M="*u8"),
              dict(row, ACCUMULATE=True, HAS_DUAL=False, RATIO_SLOT=1, DUAL_SLOT=5, APPROX_SLOT=-1, BLOCK_T=16))
    nothing = {k: False for k in everything if k.startswith(("HAS", "KL_IN", "ENT", "NEED"))}
    no_spills(F._ppo_fwd_kernel, dict(fwd, X="*fp16", M="*u8", clip_low="fp64"), dict(everything, KL_EST=1, **nothing),
              num_warps=1, num_stages=2)
    for agg in L.AGG_CODES.values():
        for block_g in (1, 2, 64, F.FINAL_TILE):  # T = 1 ... T >= FINAL_TILE
            no_spills(L._finalize_kernel, fin, {"AGG": agg, "NSTAT": F.NUM_STATS, "BLOCK_R": F.FINAL_TILE // block_g,
                                                "BLOCK_G": block_g, "BLOCK_P": F.FINAL_STAT_BLOCK},
                      num_warps=F.FINAL_WARPS)
    bwd = {n: "*fp32" for n in ("LSE", "ENT", "G_LOGP", "G_ENT", "ROW_SCALE", "SCALE")}
    bwd.update({"X": "*bf16", "DX": "*bf16", "LABELS": "*i64", "inv_t": "fp32"})
    for row_scale in (True, False):
        no_spills(P._logits_grad_kernel, bwd, {"HAS_TEMP": True, "HAS_LOGP_GRAD": True, "HAS_ENT_GRAD": True,
                                               "HAS_ROW_SCALE": row_scale, "HAS_SCALE": True, "BLOCK_V": 4096},
                  div=("X", "DX", "stride_xr", "stride_xt", "stride_dr", "stride_dt", "V"), num_warps=16)
    print("compiled")
    """


def test_kernels_compile_for_sm90():
    compile_for_sm90(SCRIPT)
