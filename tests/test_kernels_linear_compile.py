"""The fused linear kernels lower through the real Triton compiler to sm_90 machine code, without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects; this compiles every kernel of
rlhf_fast/kernels/linear.py with the tile configuration a CUDA bf16 / fp32 call would use (kernel_config), in a
subprocess where TRITON_INTERPRET is unset, with the bundled ptxas. It also reports the per-thread stack (register
spills) ptxas gives each kernel, which is how the GPU tile sizes were chosen.
"""
from _sm90 import compile_for_sm90

SCRIPT = """
    import os, subprocess, tempfile
    import torch
    from rlhf_fast.kernels import linear as L

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    compile_kernel = compile_one

    def compile_one(fn, types, consts, **options):  # compile, then print registers and stack (spills)
        k = compile_kernel(fn, types, consts, **options)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True).stdout
        os.unlink(f.name)
        line = [l.split() for l in usage.splitlines() if "REG:" in l]
        print(fn.__name__, options, *(line[0][:2] if line else ["?"]))

    for dtype, ty in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        cfg = L.kernel_config(4096, 151936, dtype, torch.device("cuda"))
        prec = L._dot_precision(dtype)
        tile = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        mm = dict(num_warps=cfg.mm_warps, num_stages=cfg.mm_num_stages)
        g_bn, g_bv, g_bk, g_warps, g_stages = cfg.grad_tile
        blocks = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, DOT_PREC=prec)
        compile_one(L._lse_partials_kernel, {"h_ptr": ty, "w_ptr": ty, "b_ptr": ty, "lab_ptr": "*i64",
                                             "part_ptr": "*fp32", "plane": "i64"},
                    dict(TEMP=0.7, HAS_BIAS=True, TILES_PER_SPLIT=cfg.tiles_per_split, **blocks), **tile)
        compile_one(L._grad_logits_kernel, {"h_ptr": ty, "w_ptr": ty, "b_ptr": ty, "lab_ptr": "*i32",
                                            "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32",
                                            "gent_ptr": "*fp32", "g_ptr": ty, "dbias_ptr": "*fp32"},
                    dict(TEMP=0.7, HAS_BIAS=True, HAS_GLP=True, HAS_GENT=True, WRITE_DBIAS=True, BLOCK_N=g_bn,
                         BLOCK_V=g_bv, BLOCK_K=g_bk, DOT_PREC=prec), num_warps=g_warps, num_stages=g_stages)
        mm_blocks = dict(BLOCK_M=cfg.mm_block_m, BLOCK_H=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k, DOT_PREC=prec)
        compile_one(L._dhidden_kernel, {"g_ptr": ty, "w_ptr": ty, "dh_ptr": "*fp32"},
                    dict(ACCUMULATE=True, **mm_blocks), **mm)
        compile_one(L._dweight_kernel, {"g_ptr": ty, "h_ptr": ty, "dw_ptr": ty}, mm_blocks, **mm)
    compile_one(L._lse_combine_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "logp_ptr": "*fp32",
                                        "ent_ptr": "*fp32", "plane": "i64"}, dict(BLOCK=128))
    print("compiled")
    """


def test_linear_kernels_compile_for_sm90():
    print(compile_for_sm90(SCRIPT, timeout=600))
