"""Baton's Triton kernels compiled ahead of time for a GPU that is not here (down to ptxas).

No GPU is needed: Triton's real compiler turns each kernel into a cubin for a target
(`GPUTarget("cuda", 75, 32)`: a T4) with the signatures and tile sizes the launchers use.

Two sets of signatures:
- `kernel_specs(dt)`: written by hand, an 8B model's tiles in one compute dtype;
  `tests/test_patch.py` compiles them for sm_75 and sm_90, and `scripts/bench_startup.py` times
  a cold compile against one served from TRITON_CACHE_DIR;
- `kernel_signatures.json` (beside this file): the launches a real session makes, recorded
  under the interpreter by `python scripts/aot_record.py` (`record_launches`: every
  Baton kernel's launch, its argument types, constexprs and warps), from a training step of
  SmolLM2's shapes in fp32, fp16 and bf16 autocast: fp32 RMSNorm on an fp16 run's fp32
  residual stream, fp16 q with fp32 cos/sin in RoPE, multi-row CE and RMSNorm tiles, 4-warp
  launches. `compile_recorded` compiles exactly those for sm_75, sm_80, sm_89 and sm_90
  (`tests/test_aot_signatures.py`, and `scripts/aot_platforms.py` with the Triton versions of
  Kaggle's and Colab's images). The JIT also specialises integer arguments (equal to 1,
  divisible by 16); compiled here without those hints, each kernel is the general variant.
Run it with TRITON_INTERPRET unset to compile (the interpreter compiles nothing).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = ((75, "fp16"), (90, "bf16"))  # T4 trains in fp16, sm_80 and newer in bf16
ARCHS = (75, 80, 89, 90)  # T4; A100; L4; H100
SIGNATURES = Path(__file__).resolve().parent / "kernel_signatures.json"
KERNEL_MODULES = ("cross_entropy", "nf4", "rmsnorm", "rope", "swiglu")
_TYPES = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16", "int64": "i64",
          "int32": "i32", "uint8": "u8", "int8": "i8", "bool": "i1"}


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


# --- signatures recorded from a real session ---------------------------------------------


def _kernels() -> dict:
    """name -> the @triton.jit objects of Baton's kernel modules."""
    import importlib

    found = {}
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"baton.kernels.{module}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "run") and hasattr(obj, "fn"):
                found[f"{module}.{name}"] = obj
    return found


def _arg_type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument {value!r}")


def _launch_record(name: str, fn, args, kwargs) -> dict:
    """One launch as (kernel, signature, constexprs, options), JSON-ready."""
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    signature = {p.name: "constexpr" if p.name in constexprs else _arg_type(bound[p.name])
                 for p in params}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion")
               if k in kwargs}
    return {"kernel": name, "signature": signature,
            "constexprs": {k: bound[k] for k in sorted(constexprs)}, "options": options}


@contextmanager
def record_launches():
    """Record every launch of a Baton kernel inside the block (the kernels still run)."""
    seen: dict[str, dict] = {}
    kernels = _kernels()
    for name, kernel in kernels.items():
        def run(*args, _name=name, _kernel=kernel, _run=kernel.run, **kwargs):
            launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            record = _launch_record(_name, _kernel.fn, args, launch)
            seen.setdefault(json.dumps(record, sort_keys=True), record)
            return _run(*args, **kwargs)
        kernel.run = run
    try:
        yield seen
    finally:
        for kernel in kernels.values():
            del kernel.run  # the class's own again


def _compile_one(job: tuple) -> dict:
    """One recorded launch for one architecture (a worker process's task)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record, cap = job
    fn = _kernels()[record["kernel"]]
    started = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, record["signature"], record["constexprs"]),
                              target=GPUTarget("cuda", cap, 32), options=record["options"])
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{record['kernel']} produced no cubin for sm_{cap}")
    return {"kernel": record["kernel"], "sm": cap, "seconds": time.perf_counter() - started}


def compile_recorded(archs=ARCHS, path: Path = SIGNATURES, workers: int = 0) -> list[dict]:
    """Compile every recorded launch for each architecture, in `workers` processes (default:
    the CPUs); one row a compile. Raises on the first kernel that does not compile."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(record, cap) for record in json.loads(Path(path).read_text())["launches"]
            for cap in archs]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(_compile_one, jobs))


if __name__ == "__main__":
    # `python scripts/aot_kernels.py recorded`: the recorded launches for the four GPUs.
    done = compile_recorded() if sys.argv[1:2] == ["recorded"] else compile_all()
    print("compiled", len(done), f"in {sum(r['seconds'] for r in done):.2f} s")
