"""Where a run's session time went, for `status` and the run's page: goodput, tails, GPU-hours.

Read from the session records alone (their `timings`, state_schema/timings.py). Goodput is
training seconds over wall-clock; the run's goodput weighs each session by its wall-clock.
GPU-hours count what a platform's quota counts: a session's time from its start until it
ended (the tail after the agent exits is not the GPU's), times its GPUs; CPU sessions count
none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from baton.state_schema import PHASES, SessionRecord

from .card import percent, save_png, utc_short

# One colour a phase on the page's bars: training green, waiting greys, the rest distinct.
COLOURS = {
    "before_start": "#bdbdbd", "startup": "#9e9e9e", "setup": "#8d6e63",
    "model_load": "#5c6bc0", "pull": "#26a69a", "data": "#ffa726", "first_step": "#ab47bc",
    "train": "#43a047", "commit_stall": "#ef5350", "eval": "#29b6f6",
    "final_commit": "#c62828", "tail": "#e0e0e0",
}


def used_hours(rec: SessionRecord) -> Optional[float]:
    """Hours the session held its machine: start to end (no tail); None while it runs and
    has no timings yet."""
    if rec.timings is not None and rec.ended is not None:
        return (rec.timings.wall - rec.timings.tail) / 3600
    if rec.ended is not None:
        return (rec.ended - rec.started).total_seconds() / 3600
    return None if rec.timings is None else rec.timings.wall / 3600


def gpu_hours(records: list[SessionRecord]) -> dict[str, Any]:
    """{"total": h, "by_kind": {GPU name: h}}: hours times GPUs, summed per GPU name."""
    by_kind: dict[str, float] = {}
    for rec in records:
        hours = used_hours(rec)
        if hours is None or rec.gpu_count < 1:
            continue
        by_kind[rec.gpu] = by_kind.get(rec.gpu, 0.0) + hours * rec.gpu_count
    rounded = {kind: round(h, 3) for kind, h in sorted(by_kind.items())}
    return {"total": round(sum(by_kind.values()), 3), "by_kind": rounded}


def run_goodput(records: list[SessionRecord]) -> Optional[float]:
    """Training seconds over wall-clock, all sessions with timings together."""
    timed = [r.timings for r in records if r.timings is not None and r.timings.wall > 0]
    wall = sum(t.wall for t in timed)
    return round(sum(t.train for t in timed) / wall, 4) if wall > 0 else None


def session_fields(rec: SessionRecord) -> dict[str, Any]:
    """What `status --json` adds to each session: timings, goodput, tail, GPU-hours."""
    hours = used_hours(rec)
    return {
        "timings": rec.timings.model_dump() if rec.timings is not None else None,
        "goodput": round(rec.goodput, 4) if rec.goodput is not None else None,
        "tail_s": rec.timings.tail if rec.timings is not None else None,
        "gpu_hours": round(hours * rec.gpu_count, 3) if hours is not None else None,
    }


def run_fields(records: list[SessionRecord]) -> dict[str, Any]:
    return {"goodput": run_goodput(records), "gpu_hours": gpu_hours(records)}


# The text table's columns: phases summed into what a person tells apart at a glance.
GROUPS = {
    "start-up": ("before_start", "startup", "setup", "model_load", "pull", "data"),
    "1st step": ("first_step",), "train": ("train",),
    "commits": ("commit_stall", "final_commit"), "eval": ("eval",), "tail": ("tail",),
}


def time_table(sessions: list[dict[str, Any]]):
    """`status`'s table of where each session's time went (seconds), narrow enough for an
    80-column notebook cell; `status --json` has every phase."""
    from rich import box
    from rich.table import Table

    table = Table(title="Where the time went (seconds; start-up = load, pull and data)",
                  box=box.SIMPLE, pad_edge=False)
    for col in ("started", "goodput", *GROUPS):
        table.add_column(col, no_wrap=True, justify="left" if col == "started" else "right")
    for s in sessions:
        t = s.get("timings")
        if not t:
            continue
        cells = [f"{sum(t.get(p, 0.0) for p in parts):,.0f}" for parts in GROUPS.values()]
        table.add_row(utc_short(s["started"]), percent(s["goodput"]), *cells)
    return table


def plot_timings(sessions: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """One stacked horizontal bar a session (the `status --json` rows), a segment a phase,
    in minutes; None when no session has timings."""
    timed = [(i, s["timings"]) for i, s in enumerate(sessions, start=1) if s.get("timings")]
    if not timed:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a notebook VM or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * len(timed)))
    try:
        _draw_bars(ax, timed)
        return save_png(fig, path)
    finally:
        plt.close(fig)


def _draw_bars(ax, timed: list[tuple[int, dict[str, float]]]) -> None:
    labels = [f"session {i}" for i, _ in timed]
    left = [0.0] * len(timed)
    for phase in PHASES:
        widths = [t.get(phase, 0.0) / 60 for _, t in timed]
        if not any(widths):
            continue
        ax.barh(labels, widths, left=left, color=COLOURS[phase], label=phase.replace("_", " "),
                edgecolor="white", linewidth=0.5)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()  # session 1 on top
    ax.set(xlabel="minutes of the session", title="Where each session's time went")
    ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
