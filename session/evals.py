"""When a session measures the held-out loss: on its own schedule, never inside a commit.

An eval is a forward pass over the run's eval subset (eval.max_records records, drawn from the
seed) in the training thread, and every rank takes part. It used to run inside every
checkpoint save, the one that only measures a commit's cost included; on a CPU it cost more
than three steps each time. Now checkpoints save and evals run when `eval.every` says:

- `auto` (the default): after at least `1 / AUTO_SHARE` times the last eval's cost of
  session time, so periodic evals take at most AUTO_SHARE of a session; the base eval before
  step 1 (once a run) fits in the rest of the 2% allowed when the record cap holds;
- `N steps`, or a duration (`30m`): every N optimizer steps, or that much session time;
- `off`: only the base eval and the eval of a finished run.

The last step of a run is always evaluated (the final adapter's loss). No eval starts when the
clock has no room for it before the deadline.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, Iterable, Optional, Union

from baton.state_schema import parse_eval_every

from .clock import SessionClock

# Periodic evals under auto: at most 0.5% of a session's time. The issue allows evals 2%, but
# on a 12-hour T4 session every 0.1% is 43 s of training (docs/BENCHMARKS.md's arithmetic);
# 0.5% still measures a 200-record eval a few times a session.
AUTO_SHARE = 0.005


class EvalSchedule:
    """Answers "evaluate now?" after each step; `done` tells it what the eval cost."""

    def __init__(self, every: Union[str, float], clock: SessionClock, *,
                 fallback_s: float, cost_s: float = 0.0):
        """`fallback_s`: in auto mode, the session time before a first eval whose cost is not
        known yet (no earlier session measured one); the checkpoint interval is a fair one."""
        self.kind, self.value = parse_eval_every(every)
        self.clock, self.fallback_s, self.cost_s = clock, fallback_s, cost_s
        self.last = time.monotonic()
        self.steps = 0
        self.tell: Callable[[str], None] = lambda _word: None
        self.timings, self.record = None, None

    def attach(self, tell: Callable[[str], None], timings, record) -> "EvalSchedule":
        """What evaluate() needs: the word to the other ranks, the timings, the record."""
        self.tell, self.timings, self.record = tell, timings, record
        return self

    def seed_from_records(self, records: Iterable) -> "EvalSchedule":
        """The latest eval cost an earlier session measured (its slowest), if any."""
        costs = [max(r.eval_seconds) for r in records if getattr(r, "eval_seconds", None)]
        if costs and not self.cost_s:
            self.cost_s = costs[-1]
        return self

    def after_step(self) -> None:
        self.steps += 1

    def interval_s(self) -> Optional[float]:
        """Session seconds between evals in auto mode (None: not time-based)."""
        if self.kind == "seconds":
            return self.value
        if self.kind == "auto":
            return self.cost_s / AUTO_SHARE if self.cost_s > 0 else self.fallback_s
        return None

    def due(self, *, finished: bool = False, now: Optional[float] = None) -> bool:
        """After a step: is an eval due? `finished`: the run's last step, evaluated once."""
        if finished:
            return self.steps > 0 and self.room()
        if self.kind == "off":
            return False
        if self.kind == "steps":
            ripe = self.steps >= (self.value or 1)
        else:
            ripe = (time.monotonic() if now is None else now) - self.last >= self.interval_s()
        return ripe and self.room()

    def room(self) -> bool:
        """Time for one eval (at its last cost, with the clock's safety factor) before the
        deadline; an eval past it would only delay the final commit."""
        left = self.clock.time_left()
        return left is None or left > self.clock.factor * self.cost_s

    def done(self, seconds: float, now: Optional[float] = None) -> None:
        self.cost_s = seconds
        self.last = time.monotonic() if now is None else now
        self.steps = 0

    def evaluate(self, trainer) -> Optional[float]:
        """The held-out loss on every rank: the base model's before the run's first step (the
        yardstick, kept in the cursor), else the adapter's now. Counted in the "eval" phase
        and in the record (its loss and its seconds)."""
        self.tell("eval")
        base = trainer.needs_base
        with self.timings.phase("eval") if self.timings is not None else nullcontext():
            began = time.perf_counter()
            loss = trainer.measure_base() if base else trainer.evaluate()
            seconds = time.perf_counter() - began
        if loss is None:  # the run has no eval split
            return None
        self.done(seconds)
        if self.record is not None:
            self.record.eval_seconds.append(round(seconds, 3))
            if base:
                self.record.base_eval_loss = loss
            else:
                self.record.eval_losses.append((trainer.cursor.step, float(loss)))
        return loss
