"""Compile the recorded launches with the Triton that Kaggle's and Colab's images carry.

    python scripts/aot_platforms.py [--triton 3.6.0 ...] [--json OUT]

The suite compiles `scripts/kernel_signatures.json` with the pinned Triton
(`tests/test_aot_signatures.py`); a session runs whatever Triton its image's torch pins. This
installs each version (`pip install --target`, no dependencies: Triton brings its own
ptxas) into a folder of its own, then compiles every recorded launch for sm_75, sm_80, sm_89
and sm_90 with it, in a child process whose path puts that folder first. A version whose
wheel does not install here (no wheel for this Python) is reported as such, not as a failure.

The platforms' versions (`PLATFORMS`) come from the images' own package lists as stored when
this was written: googlecolab/backend-info's pip-freeze.gpu.txt (2026-08-19: torch
2.11.0+cu128, triton 3.6.0) and Kaggle/docker-python's Dockerfile.tmpl, which builds on
Colab's runtime release of 2026-05-14 (Colab's list then: torch 2.10.0+cu128, triton 3.6.0).
Newer images may carry newer versions: pass them with --triton.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = {"colab (torch 2.11.0+cu128, 2026-08-19)": "3.6.0",
             "kaggle (colab runtime 2026-05-14: torch 2.10.0+cu128)": "3.6.0"}
_COMPILE = ("import json, triton\n"
            "from baton.scripts.aot_kernels import compile_recorded\n"
            "rows = compile_recorded()\n"
            "print(json.dumps({'triton': triton.__version__, 'compiled': len(rows),"
            " 'archs': sorted({r['sm'] for r in rows})}))")


def _install(version: str, folder: Path) -> str | None:
    """None when triton==version installed into `folder`, else pip's last line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(folder), f"triton=={version}"], capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        return (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
    return None


def compile_with(version: str, work: Path) -> dict:
    """{"triton", "status", ...}: installed and compiled, not installable, or failed."""
    folder = work / f"triton-{version}"
    error = _install(version, folder)
    if error:
        return {"triton": version, "status": "not installable here", "detail": error}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]),
               TRITON_CACHE_DIR=str(work / f"cache-{version}"))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"triton": version, "status": "failed", "detail": " | ".join(tail),
                "seconds": seconds}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "compiled",
            "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", nargs="+", help="versions (default: the platforms')")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    versions = args.triton or sorted(set(PLATFORMS.values()))
    with tempfile.TemporaryDirectory() as tmp:
        results = [compile_with(v, Path(tmp)) for v in versions]
    out = {"platforms": PLATFORMS, "results": results}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
