"""The Kaggle weekly GPU quota, as the autopilot weighs it before it starts a session.

Kaggle gives about 30 GPU-hours a week. A session started with less left than it needs to load
the model and reach its first checkpoint is ended by the quota before it commits anything: the
time is spent and the run does not move. So the autopilot reads the quota through the official
client (`KaggleApi.quota_view`: used, reserved by running sessions, total, refresh time) and
pushes only when

    total - used - reserved - reserve  >=  model load + one checkpoint interval

where the model load is the slowest one measured by the run's sessions (their records'
timings), or `DEFAULT_MODEL_LOAD_S` before any session measured one, and the checkpoint
interval is run.yaml's `checkpoint.every` (30m when the file is not on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

from baton.state_schema import CheckpointConfig, parse_duration

# A 7B model's download and 4-bit quantization on a Kaggle T4, with room to spare; replaced by
# what the run's own sessions measured as soon as one has.
DEFAULT_MODEL_LOAD_S = 600.0
# Names a session record's timings may give the model load (the goodput timings).
MODEL_LOAD_KEYS = ("model_load", "model_load_s", "load_model", "model")


@dataclass
class Quota:
    used_s: float
    reserved_s: float
    total_s: float
    refresh: Optional[datetime]  # when the weekly window resets (UTC)

    @property
    def left_s(self) -> float:
        return max(0.0, self.total_s - self.used_s - self.reserved_s)


def read_quota(api) -> Optional[Quota]:
    """The account's GPU quota, or None when Kaggle reports none for it."""
    response = api.quota_view()
    gpu = response.gpu_quota
    if gpu is None or gpu.total_time_allowed is None:
        return None
    refresh = response.quota_refresh_time
    if refresh is not None and refresh.utcoffset() is None:
        refresh = refresh.replace(tzinfo=timezone.utc)  # the SDK's timestamps are naive UTC
    return Quota(used_s=_seconds(gpu.time_used), reserved_s=_seconds(gpu.time_reserved),
                 total_s=_seconds(gpu.total_time_allowed), refresh=refresh)


def _seconds(delta) -> float:
    return delta.total_seconds() if delta is not None else 0.0


def model_load_s(records: Iterable) -> Optional[float]:
    """The slowest model load the run's session records measured, if any measured one."""
    loads = []
    for record in records:
        timings = getattr(record, "timings", None) or {}
        if not isinstance(timings, dict):
            timings = timings.model_dump() if hasattr(timings, "model_dump") else {}
        for name in MODEL_LOAD_KEYS:
            if isinstance(timings.get(name), (int, float)) and timings[name] > 0:
                loads.append(float(timings[name]))
                break
    return max(loads) if loads else None


def checkpoint_every_s(config: Optional[str]) -> tuple[float, str]:
    """(seconds, where from): run.yaml's checkpoint.every when the file is here."""
    default = parse_duration(CheckpointConfig().every)
    path = Path(config) if config else None
    if path is None or not path.is_file():
        return default, f"checkpoint.every default {CheckpointConfig().every}"
    import yaml

    try:
        every = ((yaml.safe_load(path.read_text()) or {}).get("checkpoint") or {}).get("every")
        if every is not None:
            return parse_duration(every), f"checkpoint.every {every} in {path}"
    except (yaml.YAMLError, ValueError, AttributeError):
        pass  # the agent reports a bad run.yaml in the session itself; here, the default
    return default, f"checkpoint.every default {CheckpointConfig().every}"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def describe_refresh(refresh: Optional[datetime], now: Optional[datetime] = None) -> str:
    if refresh is None:
        return "Kaggle did not say when the quota refreshes"
    now = now or datetime.now(timezone.utc)
    wait = max(0.0, (refresh - now).total_seconds())
    days, rest = divmod(int(wait), 86400)
    return (f"the quota refreshes {refresh.strftime('%Y-%m-%d %H:%M UTC')} (in "
            f"{f'{days} d ' if days else ''}{rest // 3600} h {rest % 3600 // 60} min)")


def verdict(quota: Quota, need_s: float, reserve_s: float, why_need: str,
            now: Optional[datetime] = None) -> tuple[bool, str]:
    """(may a session start, the line that says why)."""
    usable = quota.left_s - reserve_s
    held = f", {hours(reserve_s)} held in reserve" if reserve_s else ""
    state = (f"GPU quota {hours(quota.left_s)} left of {hours(quota.total_s)} "
             f"({hours(quota.used_s)} used{held})")
    if usable >= need_s:
        return True, f"{state}; a session needs {hours(need_s)} ({why_need})"
    return False, (f"waiting: {state}, but a session needs {hours(need_s)} ({why_need}); "
                   f"{describe_refresh(quota.refresh, now)}")
