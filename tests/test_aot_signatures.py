"""The launches a real session records (scripts/kernel_signatures.json) compile for every GPU.

No GPU here: Triton's real compiler (down to ptxas, the pinned Triton) takes each launch a
training step of SmolLM2's shapes made under the interpreter, in fp32, fp16 and bf16, and
compiles it for sm_75 (T4), sm_80 (A100), sm_89 (L4) and sm_90 (H100). The file is written by
`TRITON_INTERPRET=1 BATON_KERNELS=triton python scripts/aot_record.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from baton.scripts.aot_kernels import ARCHS, SIGNATURES

ROOT = Path(__file__).resolve().parent.parent


def _launches() -> list[dict]:
    return json.loads(SIGNATURES.read_text())["launches"]


def _pointers(record: dict) -> dict:
    return {k: v for k, v in record["signature"].items() if v.startswith("*")}


def test_the_recorded_launches_cover_what_the_hand_list_missed():
    launches = _launches()
    kernels = {r["kernel"] for r in launches}
    assert {"rmsnorm._rmsnorm_fwd_kernel", "rmsnorm._rmsnorm_bwd_kernel", "rope._rope_kernel",
            "swiglu._swiglu_fwd_kernel", "swiglu._swiglu_bwd_kernel",
            "cross_entropy._ce_grad_kernel", "nf4._nf4_dequant_kernel"} <= kernels
    # An fp16 run's residual stream is fp32: RMSNorm fp32 in and out.
    assert any(r["kernel"] == "rmsnorm._rmsnorm_fwd_kernel" and _pointers(r)["X"] == "*fp32"
               and _pointers(r)["Y"] == "*fp32" for r in launches)
    # RoPE on fp16 q with HF's fp32 cos/sin.
    assert any(r["kernel"] == "rope._rope_kernel" and _pointers(r)["X"] == "*fp16"
               and _pointers(r)["COS"] == "*fp32" for r in launches)
    # Multi-row RMSNorm tiles and 4-warp launches (the hand list had one tile, 8 warps).
    assert any(r["kernel"].startswith("rmsnorm.") and r["constexprs"]["BLOCK_R"] > 1
               for r in launches)
    assert any(r["options"].get("num_warps", 4) == 4 for r in launches)


def test_recorded_launches_compile_for_t4_a100_l4_and_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    code = ("from baton.scripts.aot_kernels import compile_recorded\n"
            "rows = compile_recorded()\n"
            "print('compiled', len(rows), sorted({r['sm'] for r in rows}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"compiled {len(_launches()) * len(ARCHS)} {sorted(ARCHS)}" in proc.stdout
