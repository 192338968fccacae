"""The session's stopwatch: seconds per phase, fed by one-line `with timings.phase(...)` calls.

The loop wraps each piece of work in the phase it belongs to (state_schema/timings.py lists
them); the time before the session's first phase (process start to a validated config, then
store, spec and lease) is taken from wall-clock marks, since it spans agent.py and the loop.
The wall-clock itself is measured separately, from the session's start to its limit, so the
parts can be checked against it instead of being defined to add up.

Light on purpose (no torch): agent.py builds one right after the config is validated.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from baton.state_schema import PHASES, SessionTimings


def process_start(proc: Path = Path("/proc")) -> Optional[float]:
    """When this process started, as a Unix time (to about 10 ms); None where /proc cannot tell.

    /proc/self/stat field 22 is the start in clock ticks after boot and /proc/uptime the
    seconds since boot now; their difference is the process's age. (btime, the boot time in
    /proc/stat, is whole seconds: too coarse for a short session.)"""
    try:
        stat = (proc / "self" / "stat").read_text()
        uptime = float((proc / "uptime").read_text().split()[0])
        ticks = float(stat.rsplit(")", 1)[-1].split()[19])  # field 22: 20th after pid, comm
    except (OSError, ValueError, IndexError):
        return None
    age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - max(age, 0.0)


class Timings:
    """Seconds per phase of one session. `started` is the process's start, `validated` when
    agent.py had a valid config (both Unix times); phases are timed with perf_counter.
    Without `validated` (a session run from Python, not from agent.py) both are now."""

    def __init__(self, started: Optional[float] = None, validated: Optional[float] = None):
        now = time.time()
        self.validated = validated if validated is not None else now
        if started is None:
            started = (process_start() or now) if validated is not None else now
        self.started = min(started, self.validated)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = max(self.validated - self.started, 0.0)
        # Wall-clock (Unix) of the end of the last accounted stretch: `lap` counts from it.
        self._mark = self.validated
        self.window_start: Optional[float] = None  # the session's start, by the clock
        self.window_end: Optional[float] = None  # start + limit; None without a limit

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the block's seconds in `name` (nested phases count in both: do not nest)."""
        if name not in self.seconds:
            raise KeyError(f"unknown phase {name!r}; the phases are {', '.join(PHASES)}")
        began, began_wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - began
            self._mark = max(self._mark, began_wall + time.perf_counter() - began)

    def lap(self, name: str) -> None:
        """Count everything since the last accounted stretch in `name` (setup spans several
        functions: agent.py, the store, the spec, the lease)."""
        now = time.time()
        self.seconds[name] += max(now - self._mark, 0.0)
        self._mark = now

    def window(self, start: float, limit: Optional[float]) -> None:
        """The session's window from the clock: where `wall` starts and ends."""
        self.window_start = start
        self.window_end = None if limit is None else start + limit

    def snapshot(self, ended: Optional[float] = None, *, tail: bool = True) -> SessionTimings:
        """The record's timings at `ended` (now, for a record written mid-session: then the
        phase in progress is not counted yet and the tail is not known). `tail`: count the
        time from `ended` to the limit; False for a session that had nothing left to do (the
        run finished) or could not go on, whose wall-clock ends where it ended."""
        final = ended is not None
        ended = time.time() if ended is None else ended
        began = self.started if self.window_start is None else min(self.started,
                                                                   self.window_start)
        parts = dict(self.seconds)
        parts["before_start"] = max(self.started - began, 0.0)
        end = ended
        if final and tail and self.window_end is not None and self.window_end > ended:
            parts["tail"], end = self.window_end - ended, self.window_end
        rounded = {k: round(v, 3) for k, v in parts.items()}
        return SessionTimings(**rounded, wall=round(end - began, 3))
