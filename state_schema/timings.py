"""Where a session's wall-clock went: seconds per phase, kept in its SessionRecord.

The parts are measured one by one (session/timings.py feeds them); `wall` is measured on its
own, from the session's start (the platform's container start, or this process's start) to the
end of its time limit (to the process's end without a limit). What the parts do not cover is
`unaccounted`: small by design (a test holds it under 2% of `wall`), never folded into a part.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# The phases in the order a session meets them; status and the run's page draw them in this
# order. `train` is what goodput counts; `tail` is the time left unused before the deadline.
PHASES: tuple[str, ...] = (
    "before_start",  # session start (container, --session-start) -> this process started
    "startup",       # process start -> the config is validated (interpreter, imports, config)
    "setup",         # store, spec, lease, session record, torch import, local spool
    "model_load",    # download, quantization, LoRA, kernel patching, optimizer
    "pull",          # the checkpoint: download, verification, adapter and cursor loaded
    "data",          # fetch, read, tokenize, pack
    "first_step",    # the session's first optimizer step (kernel compilation included)
    "train",         # every later optimizer step
    "commit_stall",  # checkpoint saves (and bookkeeping) in the training thread
    "eval",          # the base eval before step 1 and every periodic eval
    "final_commit",  # the last, synchronous checkpoint
    "tail",          # unused: from the session's end to its time limit
)


class SessionTimings(BaseModel):
    """Seconds per phase of one session (a snapshot while it runs, final once it ended)."""

    model_config = ConfigDict(extra="ignore")

    before_start: float = 0.0
    startup: float = 0.0
    setup: float = 0.0
    model_load: float = 0.0
    pull: float = 0.0
    data: float = 0.0
    first_step: float = 0.0
    train: float = 0.0
    commit_stall: float = 0.0
    eval: float = 0.0
    final_commit: float = 0.0
    tail: float = 0.0
    wall: float = 0.0  # measured on its own: the session's start to its limit (or its end)

    def parts(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PHASES}

    @property
    def unaccounted(self) -> float:
        """Wall-clock no part measured (lease release, thread hand-offs, rounding)."""
        return self.wall - sum(self.parts().values())

    @property
    def goodput(self) -> float:
        """The share of the session's wall-clock spent in optimizer steps after the first."""
        return self.train / self.wall if self.wall > 0 else 0.0
