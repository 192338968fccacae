"""Exit codes and the defaults more than one part of the session layer relies on.

One home for each: `agent.py`, the session loop, `status`, `plan`, `merge.py` and the demo all
return these codes, and DESIGN.md's exit-code table documents exactly these values.
"""

from __future__ import annotations

from pathlib import Path

OK = 0  # a command that did what it was asked (status, plan, merge)
FINISHED = 0  # run: all steps done, final checkpoint committed
FAILED = 1  # an unexpected error or an unreachable store; the last checkpoint is intact
INVALID = 2  # bad input: config, data, credentials, a spec that does not match the run
HELD = 73  # another live agent holds the run's lease; nothing was changed
PAUSED = 75  # the session's time is nearly spent or a signal came; a checkpoint is committed

# Kaggle's session limit and Colab's best case: what a session lasts when nothing says.
DEFAULT_SESSION_LIMIT_S = 12 * 3600.0


def default_workdir(run: str) -> Path:
    """Where a session keeps its local copies (checkpoint, data, spool) unless --workdir."""
    return Path.home() / ".cache" / "baton" / run
