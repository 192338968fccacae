"""Baton's Triton kernels compiled ahead of time for a GPU that is not here (down to ptxas).

No GPU is needed: Triton's real compiler turns each kernel into a cubin for a target
(`GPUTarget("cuda", 75, 32)`: a T4) with the signatures and tile sizes the launchers use. Two
callers: `tests/test_patch.py` checks that every kernel compiles for sm_75 and sm_90, and
`scripts/bench_startup.py` times a cold compile against one served from TRITON_CACHE_DIR, which
is what a session's first step pays for kernel compilation with and without the cache.
Run it with TRITON_INTERPRET unset (the interpreter compiles nothing).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = ((75, "fp16"), (90, "bf16"))  # T4 trains in fp16, sm_80 and newer in bf16


def kernel_specs(dt: str) -> list[tuple]:
    """(kernel, signature, constexprs, options) of every Baton kernel in compute dtype `dt`."""
    from baton.kernels import cross_entropy, geglu, nf4, rmsnorm, rope, swiglu

    p, i, c = f"*{dt}", "i32", "constexpr"
    rope_sig = [("OUT", p), ("X", p), ("COS", p), ("SIN", p)] + [(n, i) for n in (
        "so_b", "so_h", "so_s", "sx_b", "sx_h", "sx_s", "sc_b", "sc_s", "seq_len", "n_heads")] + [
        (n, c) for n in ("HALF", "BLOCK_S", "BLOCK_H", "BLOCK_D", "BACKWARD")]
    rope_const = dict(HALF=64, BLOCK_S=2, BLOCK_H=32, BLOCK_D=64)
    return [
        (rmsnorm._rmsnorm_fwd_kernel, dict(Y=p, X=p, W="*fp32", RSTD="*fp32", stride_y=i,
         stride_x=i, n_rows=i, n_cols=i, eps="fp32", offset="fp32", BLOCK_R=c, BLOCK_N=c,
         CAST_AFTER=c), dict(BLOCK_R=1, BLOCK_N=4096, CAST_AFTER=False), {}),
        (rmsnorm._rmsnorm_bwd_kernel, dict(DX=p, DW_PARTIAL="*fp32", DY=p, X=p, W=p, RSTD="*fp32",
         stride_dx=i, stride_dy=i, stride_x=i, n_rows=i, n_cols=i, rows_per_program=i,
         offset="fp32", BLOCK_R=c, BLOCK_N=c), dict(BLOCK_R=2, BLOCK_N=2048), {}),
        (rope._rope_kernel, dict(rope_sig), dict(rope_const, BACKWARD=False), {}),
        (rope._rope_kernel, dict(rope_sig), dict(rope_const, BACKWARD=True), {}),
        (swiglu._swiglu_fwd_kernel, dict(H=p, GATE=p, UP=p, n_elements=i, BLOCK=c),
         dict(BLOCK=1024), {}),
        (swiglu._swiglu_bwd_kernel, dict(DGATE=p, DUP=p, DH=p, GATE=p, UP=p, n_elements=i,
         BLOCK=c), dict(BLOCK=1024), {}),
        (geglu._geglu_fwd_kernel, dict(H=p, GATE=p, UP=p, n_elements=i, K=c, C=c, BLOCK=c),
         dict(K=geglu._K, C=geglu._C, BLOCK=1024), {}),
        (geglu._geglu_bwd_kernel, dict(DGATE=p, DUP=p, DH=p, GATE=p, UP=p, n_elements=i, K=c,
         C=c, BLOCK=c), dict(K=geglu._K, C=geglu._C, BLOCK=1024), {}),
        (cross_entropy._ce_grad_kernel, dict(LOGITS="*fp32", LABELS="*i64", LOSS="*fp32",
         stride_row=i, n_rows=i, n_cols=i, scale="fp32", ignore_index=i, logit_scale="fp32",
         softcap="fp32", BLOCK_R=c, BLOCK_V=c, SOFTCAP=c),
         dict(BLOCK_R=1, BLOCK_V=4096, SOFTCAP=False), {}),
        # NF4 with double quantization (uint8 absmax codes), as a QLoRA model is loaded; the
        # launcher's options: 4 warps (the default) and no FMA contraction.
        (nf4._nf4_dequant_kernel, dict(OUT=p, PACKED="*u8", ABSMAX="*u8", CODE="*fp32",
         ABSMAX2="*fp32", CODE2="*fp32", OFFSET="*fp32", n_elements=i, n_bytes=i, HALF_BLOCK=c,
         BLOCKSIZE2=c, NESTED=c, OUT_BF16=c, BLOCK=c),
         dict(HALF_BLOCK=32, BLOCKSIZE2=256, NESTED=True, OUT_BF16=dt == "bf16", BLOCK=1024),
         dict(num_warps=4, enable_fp_fusion=False)),
    ]


def compile_all(targets=TARGETS) -> list[dict]:
    """Compile every kernel for each (capability, dtype); one row per kernel with its seconds.
    Where TRITON_CACHE_DIR already holds a kernel, Triton serves it from there."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for cap, dt in targets:
        for fn, signature, consts, options in kernel_specs(dt):
            started = time.perf_counter()
            # 8 warps: what the launchers pick for their 4096-element tiles.
            compiled = triton.compile(ASTSource(fn, signature, consts),
                                      target=GPUTarget("cuda", cap, 32),
                                      options={"num_warps": 8, **options})
            if not compiled.asm.get("cubin"):
                raise RuntimeError(f"{fn.__name__} produced no cubin for sm_{cap}")
            rows.append({"kernel": fn.__name__, "sm": cap, "dtype": dt,
                         "seconds": time.perf_counter() - started})
    return rows


if __name__ == "__main__":
    done = compile_all()
    print("compiled", len(done), f"in {sum(r['seconds'] for r in done):.2f} s")
