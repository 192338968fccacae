"""The session clock: deadline arithmetic, the learned margin, platform start and limit."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from baton.state_schema import SessionRecord
from baton.session.clock import (
    ClockError,
    SessionClock,
    container_start,
    describe,
    detect_platform,
    parse_start,
    resolve_window,
)

T0 = 1_800_000_000.0


def test_margin_never_below_floor():
    clock = SessionClock(T0, 60.0, floor=10.0, factor=1.5)
    assert clock.margin() == 10.0
    clock.observe_step(1.0)
    assert clock.margin() == 10.0  # no commit measured yet: the floor is the guess
    clock.observe_commit(2.0)
    assert clock.margin() == 4.5  # both measured: 1.5 * 3, the guess no longer applies
    quick = SessionClock(T0, 60.0, floor=10.0, factor=1.5).seed([0.2], [0.3])
    assert quick.margin() == 3.0  # the small floor left for the record, the release, the exit


def test_margin_grows_with_slowest_step_and_commit():
    clock = SessionClock(T0, 3600.0, floor=10.0, factor=1.5)
    for s in (2.0, 9.0, 3.0):
        clock.observe_step(s)
    clock.observe_commit(20.0)
    clock.observe_commit(11.0)
    assert clock.margin() == pytest.approx(1.5 * (9.0 + 20.0))
    assert clock.deadline() == pytest.approx(T0 + 3600.0 - 43.5)


def test_only_recent_costs_count():
    clock = SessionClock(T0, 3600.0, floor=0.0, factor=1.0, recent=3)
    clock.observe_step(100.0)  # a first step that compiled kernels
    for _ in range(3):
        clock.observe_step(1.0)
    assert clock.slowest_step == 1.0


def test_should_stop_at_deadline_not_before():
    clock = SessionClock(T0, 60.0, floor=10.0)
    assert not clock.should_stop(now=T0)
    assert not clock.should_stop(now=T0 + 49.9)
    assert clock.should_stop(now=T0 + 50.0)
    assert clock.time_left(now=T0 + 20.0) == pytest.approx(30.0)


def test_no_limit_never_stops():
    clock = SessionClock(T0, None)
    assert clock.deadline() is None
    assert clock.time_left(now=T0 + 1e9) is None
    assert not clock.should_stop(now=T0 + 1e9)
    assert clock.room_for_commit(now=T0 + 1e9)


def test_room_for_commit_refuses_late_periodic_checkpoints():
    clock = SessionClock(T0, 100.0, floor=10.0, factor=2.0)
    clock.observe_commit(5.0)  # margin = 2 * 5 = 10; deadline at T0 + 90
    assert clock.room_for_commit(now=T0 + 50.0)  # 40 s left > 10
    assert not clock.room_for_commit(now=T0 + 85.0)  # 5 s left


def test_rejects_non_positive_limit():
    with pytest.raises(ClockError):
        SessionClock(T0, 0.0)


def test_seeded_from_earlier_session_records():
    records = [
        SessionRecord(session_id="a", host="h", slowest_step_s=4.0,
                      save_seconds=[1.0, 2.0], upload_seconds=[3.0, 10.0]),
        SessionRecord(session_id="b", host="h", slowest_step_s=6.0,
                      save_seconds=[1.0], upload_seconds=[2.0]),
        SessionRecord(session_id="c", host="h"),  # crashed before measuring anything
    ]
    clock = SessionClock(T0, 3600.0, floor=1.0, factor=1.5).seed_from_records(records)
    assert clock.slowest_step == 6.0
    assert clock.slowest_commit == 12.0  # 2 s save + 10 s upload of session a
    assert clock.margin() == pytest.approx(1.5 * 18.0)


def test_parse_start_iso_and_now():
    assert parse_start("now", now=T0) == T0
    assert parse_start(None) is None
    utc = datetime(2026, 1, 31, 9, 0, tzinfo=timezone.utc).timestamp()
    assert parse_start("2026-01-31T09:00:00Z") == utc
    assert parse_start("2026-01-31T10:00:00+01:00") == utc
    with pytest.raises(ClockError, match="ISO 8601"):
        parse_start("yesterday")


def test_detect_platform_from_environment():
    assert detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}) == "kaggle"
    assert detect_platform({"COLAB_RELEASE_TAG": "release-colab_2026"}) == "colab"
    assert detect_platform({"HOME": "/root"}) is None


def fake_proc(tmp_path: Path, *, boot: float, ticks: int) -> Path:
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "stat").write_text(f"cpu  1 2 3\nbtime {int(boot)}\nprocesses 9\n")
    # The command name holds a space and a ')' to check the parser splits after the last one.
    fields = ["S"] + ["0"] * 18 + [str(ticks)] + ["0"] * 10
    (proc / "1" / "stat").write_text(f"1 (my) init) {' '.join(fields)}\n")
    return proc


def test_container_start_from_proc(tmp_path):
    import os

    hz = os.sysconf("SC_CLK_TCK")
    proc = fake_proc(tmp_path, boot=T0, ticks=30 * hz)
    assert container_start(proc) == pytest.approx(T0 + 30)
    assert container_start(tmp_path / "missing") is None


def test_window_on_kaggle_uses_container_start_and_12h(tmp_path):
    proc = fake_proc(tmp_path, boot=T0, ticks=0)
    window = resolve_window(None, None, agent_start=T0 + 600,
                            environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, proc=proc)
    assert (window.start, window.limit) == (T0, 12 * 3600.0)
    assert (window.start_source, window.limit_source) == ("kaggle", "kaggle")


def test_window_flags_win_over_platform(tmp_path):
    proc = fake_proc(tmp_path, boot=T0, ticks=0)
    window = resolve_window(T0 + 5, 60.0, agent_start=T0 + 600,
                            environ={"COLAB_GPU": "1"}, proc=proc)
    assert (window.start, window.limit, window.start_source) == (T0 + 5, 60.0, "flag")


def test_window_elsewhere_is_agent_start_without_limit(tmp_path):
    window = resolve_window(None, None, agent_start=T0, environ={}, proc=tmp_path)
    assert (window.start, window.limit) == (T0, None)
    assert (window.start_source, window.limit_source) == ("agent", "none")


def test_describe_durations():
    assert describe(None) == "no limit"
    assert describe(9.4) == "9s"
    assert describe(245) == "4m 05s"
    assert describe(12 * 3600 + 180) == "12h 03m"
    assert describe(-5) == "-5s"
