"""`plan`'s bill: how many sessions and GPU-hours a run needs, against a Kaggle week.

From one tokens/s figure: the one the run's earlier sessions measured (tokens over training
seconds, in the store's session records), or `--tokens-per-s`. The arithmetic, stated once:

    training hours  = tokens / (tokens/s) / 3600
    session hours   = training hours / goodput          (goodput: measured, else a guess)
    sessions        = ceil(session hours / session limit)
    GPU-hours       = session hours x GPUs a session
    Kaggle weeks    = session hours / 30                (Kaggle's weekly GPU quota)

Reading the store is best effort: plan must work before the run exists and off-line, so a
store that cannot be read (or a run not created yet) leaves the flag or nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from baton.state_schema import RunConfig, SessionRecord

from baton.handoff import StoreError, open_store
from baton.handoff.retry import RetryPolicy
from baton.handoff.runstore import RunStore

from .goodput import run_goodput

KAGGLE_WEEK_H = 30.0  # Kaggle's weekly GPU quota
KAGGLE_SESSION_H = 12.0  # and its longest session
# Without a measured goodput: the start-up of a session (install, model load, first compile)
# is the loss that matters, about 10 minutes of a 12-hour session.
GUESSED_SETUP_S = 10 * 60
QUICK = RetryPolicy(attempts=2, max_seconds=10.0, max_wait=1.0)  # plan must not hang on a store


def earlier_sessions(config: RunConfig) -> list[SessionRecord]:
    """The run's session records in its store; [] when there are none or they cannot be read."""
    if "://" not in config.store and not Path(config.store).expanduser().is_dir():
        return []  # a folder store that does not exist yet: nothing to read (and none made)
    try:
        store = open_store(config.store, retry=QUICK)
    except (StoreError, ValueError, ImportError):
        return []
    try:
        return RunStore(store, config.run).read_sessions()
    except (StoreError, OSError):
        return []
    finally:
        store.close()


def measured(records: list[SessionRecord]) -> dict[str, Any]:
    """tokens/s, goodput, tokens a step and GPUs a session measured by earlier sessions."""
    trained = [r for r in records if r.train_seconds > 0 and r.tokens > 0]
    if not trained:
        return {}
    steps = sum(r.steps for r in trained)
    return {
        "tokens_per_s": sum(r.tokens for r in trained) / sum(r.train_seconds for r in trained),
        "goodput": run_goodput(records),
        "tokens_per_step": sum(r.tokens for r in trained) / steps if steps else None,
        "gpus": max(max(r.gpu_count for r in trained), 1),
        "sessions": len(trained),
    }


def estimate(total_tokens: Optional[int], *, tokens_per_s: Optional[float], source: str,
             goodput: Optional[float], session_limit_s: float, gpus: int = 1) -> dict[str, Any]:
    """The bill of `total_tokens` at `tokens_per_s` (see the module's arithmetic)."""
    out: dict[str, Any] = {"tokens_per_s": tokens_per_s, "tokens_per_s_source": source,
                           "tokens_total": total_tokens, "session_limit_h": session_limit_s / 3600,
                           "kaggle_week_h": KAGGLE_WEEK_H, "gpus_per_session": gpus}
    guessed = max(1.0 - GUESSED_SETUP_S / session_limit_s, 0.05)
    out["goodput"], out["goodput_source"] = (goodput, "measured") if goodput else (
        round(guessed, 4), "guess")
    if not tokens_per_s or total_tokens is None:
        return out
    train_h = total_tokens / tokens_per_s / 3600
    session_h = train_h / out["goodput"]
    out.update(train_hours=round(train_h, 2), session_hours=round(session_h, 2),
               sessions=math.ceil(session_h / (session_limit_s / 3600)),
               gpu_hours=round(session_h * gpus, 2),
               kaggle_weeks=round(session_h / KAGGLE_WEEK_H, 2))
    return out


def plan_budget(config: RunConfig, steps: Optional[int], guessed_step_tokens: int,
                tokens_per_s: Optional[float], session_limit_s: float) -> dict[str, Any]:
    """`plan --json`'s "budget": the flag's figure wins, else the run's measured one."""
    found = measured(earlier_sessions(config))
    step_tokens = found.get("tokens_per_step") or guessed_step_tokens
    total = int(steps * step_tokens) if steps is not None else None
    if tokens_per_s:
        rate, source = tokens_per_s, "--tokens-per-s"
    elif found:
        rate, source = found["tokens_per_s"], f"measured by {found['sessions']} session(s)"
    else:
        rate, source = None, "none: pass --tokens-per-s, or run a session first"
    return estimate(total, tokens_per_s=rate, source=source, goodput=found.get("goodput"),
                    session_limit_s=session_limit_s, gpus=found.get("gpus", 1))


def budget_lines(budget: dict[str, Any]) -> list[str]:
    """The bill for a person, one line each."""
    if "sessions" not in budget:
        return [f"sessions and GPU-hours: no tokens/s figure ({budget['tokens_per_s_source']})"]
    return [
        f"at {budget['tokens_per_s']:,.0f} tokens/s ({budget['tokens_per_s_source']}) and "
        f"goodput {100 * budget['goodput']:.1f}% ({budget['goodput_source']}): "
        f"{budget['train_hours']:,.2f} h of training, {budget['session_hours']:,.2f} h of "
        f"sessions",
        f"{budget['sessions']} session(s) of {budget['session_limit_h']:g} h, "
        f"{budget['gpu_hours']:,.2f} GPU-hours ({budget['gpus_per_session']} GPU a session), "
        f"{budget['kaggle_weeks']:,.2f} Kaggle week(s) of {KAGGLE_WEEK_H:g} h",
    ]
