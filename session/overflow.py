"""Ending a session whose loss stays non-finite, before it silently stops learning.

fp16's range ends at 65504. When a forward pass overflows it (Qwen2/2.5's residual stream is
known to, QwenLM/Qwen3#868), the loss is inf or NaN and no loss scale can repair it: the
scaler only rescales gradients. The engine skips such a step (no weight, schedule or scaler
change; its samples are consumed and counted as skipped, not trained), and this guard ends the
session once `NONFINITE_LIMIT` steps in a row were non-finite: a run of them means the model
and precision do not fit, and every further step would waste a sample for nothing.

While a run of non-finite steps is going on no checkpoint is started (`clean` is False), so
HEAD stays on the last checkpoint whose cursor counts only good steps; the session then exits
1 without its final commit, and the next session (in fp32, or bf16 on sm_80+) retrains those
samples from that checkpoint.
"""

from __future__ import annotations

import math
from typing import Optional

NONFINITE_LIMIT = 3  # K: non-finite losses in a row that end the session


class NonFiniteLossError(RuntimeError):
    """K consecutive steps had an inf/NaN loss: the session ends with exit 1."""


def fix_for(precision: str) -> str:
    """What the person should change, by the precision that overflowed."""
    if precision == "fp16":
        return ("run again with --precision fp32 (no overflow, about 2x slower on a T4), or on "
                "a GPU of compute capability 8.0 or newer (A100, L4, H100) with --precision bf16 "
                "(the automatic choice there), or set train.precision in the config")
    return ("fp32 and bf16 have fp32's range, so this is not a precision overflow: lower "
            "train.lr, check the data for empty or huge samples, or resume from an earlier "
            "checkpoint with --takeover after fixing it")


class LossGuard:
    """Counts consecutive non-finite losses; raises NonFiniteLossError at the limit."""

    def __init__(self, precision: str, limit: int = NONFINITE_LIMIT):
        if limit < 1:
            raise ValueError(f"the non-finite limit must be at least 1, got {limit}")
        self.precision, self.limit = precision, limit
        self.streak = 0
        self.first_bad: Optional[int] = None  # the step that began the current streak
        self.total = 0  # non-finite steps this session

    @property
    def clean(self) -> bool:
        """True when the last step was finite: a checkpoint now holds only good steps."""
        return self.streak == 0

    def observe(self, step: int, loss: Optional[float]) -> None:
        if loss is None or math.isfinite(loss):
            self.streak, self.first_bad = 0, None
            return
        self.streak += 1
        self.total += 1
        if self.first_bad is None:
            self.first_bad = step
        if self.streak >= self.limit:
            raise NonFiniteLossError(self.message(step))

    def message(self, step: int) -> str:
        return (f"the training loss was inf/NaN at {self.streak} steps in a row (steps "
                f"{self.first_bad}-{step}) under {self.precision}: the forward pass overflowed "
                f"and those steps trained nothing (their samples are counted as skipped). "
                f"Nothing after step {self.first_bad - 1} was committed. Fix: "
                f"{fix_for(self.precision)}.")
