"""One retry policy for every networked backend: transient faults only.

Timeouts, connection resets, 5xx, 429 and 409 are retried with exponential backoff and jitter;
412 (a lost condition) and other 4xx are answered at once, since retrying cannot change them.
Each backend supplies the predicate that sorts its client's exceptions.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

log = logging.getLogger("baton.store")

# Long enough to ride out a store's brief outage, short enough that a session near its deadline
# still has time to spool the checkpoint locally. Tests shorten it through the environment.
ATTEMPTS = int(os.environ.get("BATON_RETRY_ATTEMPTS", "6"))
MAX_SECONDS = float(os.environ.get("BATON_RETRY_SECONDS", "120"))
MAX_WAIT = float(os.environ.get("BATON_RETRY_MAX_WAIT", "10"))
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    # The exception's class and short text only: never a request, which may carry credentials.
    log.warning("store call failed (%s: %s); retry %d", type(exc).__name__,
                str(exc)[:200], state.attempt_number)


def retrying(is_transient: Callable[[BaseException], bool]) -> Retrying:
    """A tenacity `Retrying` that retries exactly the exceptions `is_transient` accepts."""
    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(ATTEMPTS) | stop_after_delay(MAX_SECONDS),
        wait=wait_exponential_jitter(initial=min(0.2, MAX_WAIT), max=MAX_WAIT, jitter=min(1.0, MAX_WAIT)),
        before_sleep=_log_retry,
        reraise=True,
    )
