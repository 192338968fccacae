"""scripts/autopilot.py against the Kaggle double, through the official `kaggle` client.

The autopilot runs as a subprocess (the real CLI). A pushed version's notebook is stood in for
by a callable that commits a checkpoint to the run's local store, as a session would, so these
tests need no model and take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.agent_helpers import ROOT, open_run
from tests.store_helpers import make_checkpoint

SCRIPT = ROOT / "scripts" / "autopilot.py"
KERNEL = "kaggle-user/baton-run"
STEPS_PER_SESSION, TOTAL = 2, 6


def autopilot(kaggle_server, tmp_path: Path, store: Path, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kaggle_server.env(str(tmp_path / "home")))
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--kaggle", KERNEL, "--store", str(store), "--run", "t",
         "--every", "0.2s", "--repo", "https://example.invalid/baton.git", *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def session_standin(store: Path, tmp_path: Path, pause: float = 0.6):
    """What a pushed notebook does to the run: two more steps committed (finished at 6)."""
    def run(version) -> None:
        time.sleep(pause)  # the version is RUNNING for a while, as on Kaggle
        rs = open_run(str(store))
        got = rs.read_head()
        step = (got[0].step if got else 0) + STEPS_PER_SESSION
        folder = make_checkpoint(tmp_path / f"ckpt-{version.number}", step)
        from baton.handoff.checkpoint import commit_checkpoint

        commit_checkpoint(rs, folder, step=step, generation=version.number,
                          finished=step >= TOTAL)
    return run


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_pushes_sessions_until_finished_and_waits_out_a_refused_push(kaggle_server, tmp_path):
    store = tmp_path / "store"
    kaggle_server.state.on_push = session_standin(store, tmp_path)
    kaggle_server.state.hand_push_on = 2  # a person's version lands just before our second
    code, out = finish(autopilot(kaggle_server, tmp_path, store))
    assert code == 0, out
    versions = kaggle_server.versions(KERNEL)
    assert len(versions) == 3, out  # ours, the person's, ours
    assert kaggle_server.state.refused == 1
    assert "push refused" in out and "already has a version running" in out
    assert "waiting: Kaggle version is RUNNING" in out
    assert "run t is finished at step 6; stopping" in out
    assert open_run(str(store)).read_head()[0].finished
    sent = versions[0].request
    assert sent["isPrivate"] is True and sent["enableGpu"] is True
    assert sent["enableInternet"] is True and sent["machineShape"] == "NvidiaTeslaT4"
    notebook = json.loads(sent["text"])
    source = notebook["cells"][1]["source"]
    assert f'STORE = "{store}"' in source and 'RUN = "t"' in source
    assert "{{" not in source, "every placeholder filled"


def test_stops_after_two_failed_sessions_in_a_row(kaggle_server, tmp_path):
    store = tmp_path / "store"
    kaggle_server.state.on_push = lambda version: (time.sleep(0.3), "ERROR")[1]
    code, out = finish(autopilot(kaggle_server, tmp_path, store))
    assert code == 1, out
    assert len(kaggle_server.versions(KERNEL)) == 2, out
    assert "Kaggle says ERROR" in out and "stopping: 2 sessions in a row failed" in out


def test_never_pushes_while_the_lease_is_live(kaggle_server, tmp_path):
    from baton.handoff.lease import LeaseManager

    store = tmp_path / "store"
    kaggle_server.state.on_push = session_standin(store, tmp_path, pause=0.2)
    holder = LeaseManager(open_run(str(store)), host="busy-notebook")
    holder.acquire()
    proc = autopilot(kaggle_server, tmp_path, store, "--max-sessions", "1")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while sum("lease is live" in line for line in lines) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kaggle_server.versions(KERNEL) == [], "".join(lines)
    holder.release()
    assert proc.wait(timeout=60) == 0
    reader.join(timeout=10)
    out = "".join(lines)
    assert "busy-notebook" in out and len(kaggle_server.versions(KERNEL)) == 1, out
    assert "stopping: --max-sessions 1 reached; run at step 2" in out


def test_waits_for_the_quota_says_when_it_refreshes_then_pushes_on_two_t4(kaggle_server,
                                                                          tmp_path):
    """Left 2.5 h, 2 h held back: 0.5 h does not cover the assumed 10 min model load plus the
    30 min checkpoint interval, so nothing is pushed until the quota refreshes."""
    store = tmp_path / "store"
    state = kaggle_server.state
    state.on_push = session_standin(store, tmp_path, pause=0.2)
    state.quota_used_s = 27.5 * 3600
    proc = autopilot(kaggle_server, tmp_path, store, "--max-sessions", "1", "--reserve", "2h",
                     "--accelerator", "NvidiaL4")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while sum("waiting: GPU quota" in line for line in lines) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kaggle_server.versions(KERNEL) == [], "".join(lines)
    with state.lock:
        state.quota_used_s = 0.0  # the weekly window reset
    assert proc.wait(timeout=60) == 0
    reader.join(timeout=10)
    out = "".join(lines)
    waiting = next(line for line in out.splitlines() if "waiting: GPU quota" in line)
    assert "2.5 h left of 30.0 h (27.5 h used, 2.0 h held in reserve)" in waiting, waiting
    assert "needs 0.7 h (model load 10 min assumed + checkpoint.every default 30m)" in waiting
    assert f"the quota refreshes {state.quota_refresh:%Y-%m-%d %H:%M} UTC (in 2 d 23 h" \
        in waiting or "(in 3 d 0 h" in waiting, waiting
    versions = kaggle_server.versions(KERNEL)
    assert len(versions) == 1 and versions[0].request["machineShape"] == "NvidiaL4"
    assert "on GPU L4 (NvidiaL4)" in out, out


def test_the_quota_a_session_needs_comes_from_measured_model_loads():
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from baton.scripts.kaggle_quota import Quota, model_load_s, verdict

    from baton.state_schema import SessionTimings

    records = [SimpleNamespace(timings=SessionTimings(model_load=95.0)),
               SimpleNamespace(timings=None),  # a record from before the timings
               SimpleNamespace(timings=SessionTimings(model_load=140.0, data=3.0))]
    assert model_load_s(records) == 140.0 and model_load_s([]) is None
    now = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
    quota = Quota(used_s=28 * 3600, reserved_s=1800, total_s=30 * 3600,
                  refresh=datetime(2026, 12, 3, 0, 30, tzinfo=timezone.utc))
    assert quota.left_s == 1.5 * 3600
    ok, line = verdict(quota, need_s=1.5 * 3600, reserve_s=0, why_need="x", now=now)
    assert ok and "1.5 h left" in line
    ok, line = verdict(quota, need_s=1.5 * 3600, reserve_s=60, why_need="x", now=now)
    assert not ok and "refreshes 2026-12-03 00:30 UTC (in 1 d 12 h 30 min)" in line


@pytest.mark.parametrize("flags, message", [
    (["--kaggle", "no-owner"], "write OWNER/KERNEL"),
    (["--kaggle", KERNEL, "--every", "often"], "--every"),
    (["--kaggle", KERNEL, "--reserve", "lots"], "--reserve"),
    (["--kaggle", KERNEL, "--accelerator", "T4x2"], "NvidiaTeslaT4"),
    # an internal pool since 2026 (kaggle-cli #1196): refused before anything is pushed
    (["--kaggle", KERNEL, "--accelerator", "NvidiaTeslaT4Highmem"], "NvidiaTeslaT4"),
])
def test_bad_input_exits_2(tmp_path, flags, message):
    done = subprocess.run([sys.executable, str(SCRIPT), "--store", str(tmp_path), "--run", "t",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr


def test_missing_kaggle_credentials_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(SCRIPT), "--kaggle", KERNEL, "--store",
                           str(tmp_path), "--run", "t"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no Kaggle credentials" in done.stderr
