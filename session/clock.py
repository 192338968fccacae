"""The session clock: when must this session stop training to commit before the VM dies?

deadline = session_start + session_limit - margin. The margin is learned, not guessed: a safety
factor times (the slowest recent checkpoint commit + the slowest recent step), never below a
floor (a guess until a step and a commit are measured, then a small one). A session that stops training at the deadline can still run one more step it had
already begun and commit, with the factor as slack for a slower store or a busier GPU.

Session start and limit come from the command line, else from the platform (Kaggle and Colab
kill their VMs about 12 hours after the container started), else the agent's own start and no
limit. This module is light: no torch, so the CLI can build a clock before heavy imports.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Optional

from .codes import DEFAULT_SESSION_LIMIT_S

DEFAULT_FLOOR_S = 10.0  # the margin before a step and a commit are measured: a guess
# Once both are measured the margin is what they cost (times the factor), with only this floor
# for what follows the final commit: the session record, the lease's release and the process's
# exit (about a second on a busy 2-core machine; a lease left unreleased at a hard kill would
# make the next session wait out its TTL).
MEASURED_FLOOR_S = 3.0
DEFAULT_FACTOR = 1.5
RECENT = 8  # how many recent steps and commits "recent" means

# Platform -> (environment variables that reveal it, its session limit in seconds).
# Kaggle: 12 h per GPU session. Colab free tier: up to 12 h, often less; 12 h is the best case,
# a person with a shorter one passes --session-limit.
PLATFORMS: dict[str, tuple[tuple[str, ...], float]] = {
    "kaggle": (("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE"), DEFAULT_SESSION_LIMIT_S),
    "colab": (("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_BACKEND_VERSION"),
              DEFAULT_SESSION_LIMIT_S),
}


class ClockError(ValueError):
    """A session start or limit that cannot be understood."""


def detect_platform(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """'kaggle', 'colab' or None, from the variables each platform sets in its containers."""
    env = os.environ if environ is None else environ
    for name, (variables, _) in PLATFORMS.items():
        if any(v in env for v in variables):
            return name
    return None


def container_start(proc: Path = Path("/proc")) -> Optional[float]:
    """When PID 1 of this container started, as a Unix time; None where /proc cannot tell.

    /proc/1/stat field 22 counts clock ticks from boot; /proc/stat's btime is the boot time.
    Inside a container both refer to the host's boot, so their sum is the container's start.
    """
    try:
        stat = (proc / "1" / "stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in (proc / "stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # The command name (field 2) may hold spaces; fields after its closing ')' are plain.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        ticks = float(fields[19])  # field 22 overall; 20th after pid and comm
    except (IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def parse_start(value: Optional[str], *, now: Optional[float] = None) -> Optional[float]:
    """'--session-start': 'now' or an ISO 8601 time -> Unix time. A naive time is local time."""
    if value is None:
        return None
    if value.strip().lower() == "now":
        return time.time() if now is None else now
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ClockError(
            f"session start {value!r} is not an ISO 8601 time; "
            "pass e.g. 2026-01-31T09:00:00Z or 'now'"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the machine's local zone, as a person would mean it
    return moment.timestamp()


@dataclass(frozen=True)
class SessionWindow:
    """Where the session's start and limit came from, for the log and the session record."""

    start: float
    limit: Optional[float]
    start_source: str  # "flag", "kaggle", "colab", "agent"
    limit_source: str  # "flag", "kaggle", "colab", "none"


def resolve_window(
    start: Optional[float],
    limit: Optional[float],
    *,
    agent_start: float,
    environ: Optional[Mapping[str, str]] = None,
    proc: Path = Path("/proc"),
) -> SessionWindow:
    """Pick start and limit: explicit values first, then the platform's, then the agent's."""
    platform = detect_platform(environ)
    start_source, limit_source = "flag", "flag"
    if start is None:
        found = container_start(proc) if platform else None
        # A container start in the future or after the agent's means /proc lied: trust the agent.
        if found is not None and found <= agent_start:
            start, start_source = found, platform
        else:
            start, start_source = agent_start, "agent"
    if limit is None:
        if platform:
            limit, limit_source = PLATFORMS[platform][1], platform
        else:
            limit_source = "none"
    return SessionWindow(start, limit, start_source, limit_source)


class SessionClock:
    """Answers "stop now?" before each step, from the window and what steps and commits cost."""

    def __init__(
        self,
        start: float,
        limit: Optional[float],
        *,
        floor: float = DEFAULT_FLOOR_S,
        factor: float = DEFAULT_FACTOR,
        recent: int = RECENT,
    ):
        if limit is not None and limit <= 0:
            raise ClockError(f"session limit must be positive, got {limit} s")
        self.start = start
        self.limit = limit
        self.floor = floor
        self.factor = factor
        self._steps: deque[float] = deque(maxlen=recent)
        self._commits: deque[float] = deque(maxlen=recent)

    def seed(self, steps: Iterable[float] = (), commits: Iterable[float] = ()) -> "SessionClock":
        """Start from costs earlier sessions measured, so the first margin is not a guess."""
        for s in steps:
            self.observe_step(s)
        for c in commits:
            self.observe_commit(c)
        return self

    def seed_from_records(self, records: Iterable) -> "SessionClock":
        """Seed from SessionRecords (newest last): their slowest step and slowest commit."""
        records = list(records)[-self._steps.maxlen:]
        steps = [r.slowest_step_s for r in records if r.slowest_step_s > 0]
        commits = [max(_commit_costs(r)) for r in records if _commit_costs(r)]
        return self.seed(steps, commits)

    def observe_step(self, seconds: float) -> None:
        if seconds >= 0:
            self._steps.append(float(seconds))

    def observe_commit(self, seconds: float) -> None:
        if seconds >= 0:
            self._commits.append(float(seconds))

    @property
    def slowest_step(self) -> float:
        return max(self._steps, default=0.0)

    @property
    def slowest_commit(self) -> float:
        return max(self._commits, default=0.0)

    def margin(self) -> float:
        """factor x (slowest recent commit + slowest recent step): the step that may be running
        at the deadline and the final commit, with slack. Unmeasured, at least `floor`.

        With steady costs (step s, commit c) the last step ends within s after the deadline
        and the commit takes c, so the unused tail is at most margin - c = 1.5 s + 0.5 c:
        under 2 s + c (tests/test_goodput.py checks it on a fake clock) once steps and commits
        outweigh the close-out floor (3 s); below that the floor is the tail."""
        measured = self.factor * (self.slowest_commit + self.slowest_step)
        floor = MEASURED_FLOOR_S if self._steps and self._commits else self.floor
        return max(floor, measured)

    def deadline(self) -> Optional[float]:
        """Unix time after which no step may start; None without a limit."""
        if self.limit is None:
            return None
        return self.start + self.limit - self.margin()

    def time_left(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds until the deadline (negative past it); None without a limit."""
        deadline = self.deadline()
        if deadline is None:
            return None
        return deadline - (time.time() if now is None else now)

    def should_stop(self, now: Optional[float] = None) -> bool:
        left = self.time_left(now)
        return left is not None and left <= 0

    def room_for_commit(self, now: Optional[float] = None) -> bool:
        """Is there time for a periodic checkpoint before the deadline? One that would still be
        uploading at the deadline only delays the final, synchronous one."""
        left = self.time_left(now)
        return left is None or left > self.factor * self.slowest_commit


def _commit_costs(record) -> list[float]:
    """A record's per-checkpoint costs: save plus upload, paired in order."""
    saves, uploads = list(record.save_seconds), list(record.upload_seconds)
    n = max(len(saves), len(uploads))
    saves += [0.0] * (n - len(saves))
    uploads += [0.0] * (n - len(uploads))
    return [s + u for s, u in zip(saves, uploads)]


def describe(seconds: Optional[float]) -> str:
    """12h 03m / 4m 05s / 9s: a duration for a person."""
    if seconds is None:
        return "no limit"
    sign, seconds = ("-" if seconds < 0 else ""), abs(int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h {minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m {secs:02d}s"
    return f"{sign}{secs}s"


def utc_iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")
