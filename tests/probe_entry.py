#!/usr/bin/env python
"""`python -m baton.kernels.probe` as a test runs it: the fault BATON_PROBE_FAULT names first.

    BATON_PROBE_FAULT=abort:lora_mlp   the op calls abort(3), as an LLVM abort does (SIGABRT)
    BATON_PROBE_FAULT=raise:rope       the op raises, as a Triton compile error does

The ops before the named one run for real, so the probe's own code is exercised too.
tests/faults.py points session.probe.probe_command here.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAULT_ENV = "BATON_PROBE_FAULT"


class FakeCompilationError(RuntimeError):
    """What triton.compiler.errors.CompilationError looks like to the probe: an exception."""


def faulty(kind: str, op: str):
    def run(_job) -> None:
        if kind == "abort":
            os.abort()
        raise FakeCompilationError(f"at 12:8: {op} failed to compile (injected by the test)")

    return run


def main() -> int:
    from baton.kernels import probe

    kind, _, op = os.environ[FAULT_ENV].partition(":")
    if kind not in ("abort", "raise") or op not in probe.OPS:
        raise SystemExit(f"{FAULT_ENV}={os.environ[FAULT_ENV]!r}: use abort:OP or raise:OP, "
                         f"OP one of {', '.join(probe.OPS)}")
    probe.OPS[op] = faulty(kind, op)
    return probe.main()


if __name__ == "__main__":
    sys.exit(main())
