"""Triton's compile cache in the session's workdir, so a later session on the same machine
finds the kernels it compiled instead of compiling them again.

Triton reads TRITON_CACHE_DIR when it first compiles (triton.knobs reads the environment on
each access), so setting it at the start of a session, on every rank and before the model is
patched, is enough; nothing happens at import. A TRITON_CACHE_DIR the person set stands. The
cache is not copied to the store: docs/DESIGN.md ("Start-up costs") gives the figures.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TRITON_CACHE_DIR"


def keep_compile_cache(workdir: Path) -> Path:
    """Point Triton's cache at `<workdir>/triton` unless the person chose a folder; return it."""
    chosen = os.environ.get(ENV)
    if chosen:
        return Path(chosen)
    folder = Path(workdir) / "triton"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)
    return folder
