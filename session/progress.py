"""What the person running a session sees: its progress and its messages.

tests/killtest.py parses the plain `step N/M` lines printed here (and session.py's
`run '<name>': step N/M`): keep their start as it is.
"""

from __future__ import annotations

import time
from typing import Optional

from baton.handoff.secrets import scrub
from baton.state_schema import SessionRecord

from .clock import SessionClock, describe


class Progress:
    """A live bar on a terminal; a plain line every `log_every` seconds elsewhere (notebook
    cells running `!python agent.py`, CI logs), where a live display would print nothing."""

    def __init__(self, start: int, total: int, clock: SessionClock,
                 log_every: Optional[float] = None):
        from rich.console import Console

        self.start, self.total, self.clock = start, total, clock
        self.console = Console(highlight=False, soft_wrap=True)
        self.log_every = 30.0 if log_every is None else log_every
        self.last_line = float("-inf")
        self.live = None

    def __enter__(self) -> "Progress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self.live = RichProgress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TextColumn("left {task.fields[left]}"), console=self.console)
            self.task = self.live.add_task("train", total=self.total, completed=self.start,
                                           loss="-", speed="-", left=self._left())
            self.live.start()
        return self

    def __exit__(self, *_exc) -> None:
        if self.live is not None:
            self.live.stop()

    def _left(self) -> str:
        return describe(self.clock.time_left())

    def update(self, result, record: SessionRecord) -> None:
        loss = "-" if result.loss is None else f"{result.loss:.4f}"
        speed = f"{record.tokens_per_s:,.0f}"
        if self.live is not None:
            self.live.update(self.task, completed=result.step, loss=loss, speed=speed,
                             left=self._left())
            return
        now = time.monotonic()
        if now - self.last_line >= self.log_every or result.step >= self.total:
            self.last_line = now
            self.console.print(f"step {result.step}/{self.total} loss {loss} lr {result.lr:.3g} "
                               f"{speed} tok/s, session left {self._left()}", markup=False)


class Say:
    """Messages for the person running the session, scrubbed of secrets."""

    def __init__(self):
        from rich.console import Console

        # soft_wrap: a log line stays one line in a notebook cell or a CI log.
        self.console = Console(highlight=False, soft_wrap=True)
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)
        self.last_error = ""  # the reason a notification gives (session/notify.py)

    def __call__(self, message: str) -> None:
        self.console.print(scrub(message), markup=False)

    def error(self, message: str, code: int) -> int:
        self.last_error = scrub(message)
        self.errors.print(scrub(f"baton: {message}"), markup=False)
        return code
