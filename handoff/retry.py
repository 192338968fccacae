"""One retry policy for every networked backend: transient faults only.

Timeouts, connection resets, 5xx, 429 and 409 are retried with exponential backoff and jitter;
412 (a lost condition) and other 4xx are answered at once, since retrying cannot change them.
Each backend supplies the predicate that sorts its client's exceptions; the policy (how many
attempts, how long) is a value a store is opened with, so a caller that must fail fast (a test,
a status check) passes its own instead of changing a global.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
    wait_none,
)

log = logging.getLogger("baton.store")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a store tries before a fault becomes StoreUnavailableError.

    The default is long enough to ride out a store's brief outage and short enough that a
    session near its deadline still has time to spool its checkpoint locally."""

    attempts: int = 6
    max_seconds: float = 120.0
    max_wait: float = 10.0  # the longest sleep between two attempts; 0: no sleep at all

    def __post_init__(self):
        if self.attempts < 1 or self.max_seconds <= 0 or self.max_wait < 0:
            raise ValueError(f"retry policy needs attempts >= 1, max_seconds > 0 and "
                             f"max_wait >= 0, got {self}")

    def retrying(self, is_transient: Callable[[BaseException], bool]) -> Retrying:
        """A tenacity `Retrying` that retries exactly the exceptions `is_transient` accepts."""
        wait = wait_none() if self.max_wait == 0 else wait_exponential_jitter(
            initial=min(0.2, self.max_wait), max=self.max_wait, jitter=min(1.0, self.max_wait))
        return Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.max_seconds),
            wait=wait, before_sleep=_log_retry, reraise=True)

    def describe(self) -> str:
        return f"{self.attempts} attempts in at most {self.max_seconds:.0f} s"


DEFAULT_POLICY = RetryPolicy()


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    # The exception's class and short text only: never a request, which may carry credentials.
    log.warning("store call failed (%s: %s); retry %d", type(exc).__name__,
                str(exc)[:200], state.attempt_number)
