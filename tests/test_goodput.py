"""Where a session's time goes: the timings in the record, the end margin, evals that keep out
of commits, GPU-hours, and plan's bill.

One real short session runs in this process (the tiny Llama, a 25-second limit, so it pauses
on its own); everything else is arithmetic on the real classes with a fake clock.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest

from baton.handoff import open_store
from baton.handoff.runstore import RunStore
from baton.session.budget import estimate, plan_budget
from baton.session.clock import SessionClock
from baton.session.evals import AUTO_SHARE, EvalSchedule
from baton.session.goodput import gpu_hours, run_goodput
from baton.session.timings import Timings, process_start
from baton.state_schema import PHASES, RunConfig, SessionRecord, SessionTimings, utcnow
from tests.agent_helpers import write_data

T0 = 1_800_000_000.0


# -- the end margin, on a fake clock ------------------------------------------------------

def simulate_session(step_s: float, commit_s: float, *, limit: float = 3600.0,
                     first_step_s: float = 0.0, every: float = 300.0) -> float:
    """The loop's stop rule (session/loop.py) against a fake clock: steps of `step_s` (the
    first one `first_step_s`, kernels compiling), a background commit every `every` seconds
    whose cost the clock learns, then the synchronous final commit. Returns the tail."""
    clock = SessionClock(T0, limit)
    now, last_commit, steps = T0, T0, 0
    measure_first = True  # as the Checkpointer: the first commit right after step 1
    while not clock.should_stop(now=now):
        took = first_step_s if steps == 0 and first_step_s else step_s
        now += took
        clock.observe_step(took)
        steps += 1
        if (measure_first or now - last_commit >= every) and clock.room_for_commit(now=now):
            clock.observe_commit(commit_s)  # uploads in the background: no training time lost
            last_commit, measure_first = now, False
    now += commit_s  # the final, synchronous commit
    return T0 + limit - now


@pytest.mark.parametrize("step_s,commit_s", [(4.0, 3.0), (30.0, 20.0), (1.5, 0.5), (0.6, 2.5)])
def test_tail_is_at_most_two_steps_and_a_commit_with_steady_steps(step_s, commit_s):
    tail = simulate_session(step_s, commit_s)
    assert 0.0 <= tail <= 2 * step_s + commit_s


def test_margin_forgets_the_compiling_first_step():
    """A first step of 120 s (Triton compiling) leaves the margin once RECENT steps passed."""
    tail = simulate_session(5.0, 4.0, first_step_s=120.0)
    assert 0.0 <= tail <= 2 * 5.0 + 4.0


# -- the timings object -------------------------------------------------------------------

def test_timings_phases_tail_and_wall():
    timings = Timings(started=T0 - 3.0, validated=T0 - 1.0)
    timings.window(T0 - 10.0, 100.0)  # the platform's session began 7 s before this process
    with timings.phase("train"):
        pass
    timings.seconds.update(model_load=20.0, train=50.0, final_commit=2.0)
    paused = timings.snapshot(T0 + 80.0, tail=True)
    assert (paused.before_start, paused.startup) == (7.0, 2.0)
    assert paused.tail == pytest.approx(10.0) and paused.wall == pytest.approx(100.0)
    assert paused.goodput == pytest.approx(0.5)
    finished = timings.snapshot(T0 + 80.0, tail=False)  # nothing left to train: no tail
    assert finished.tail == 0.0 and finished.wall == pytest.approx(90.0)
    with pytest.raises(KeyError, match="unknown phase 'training'"):
        with timings.phase("training"):
            pass


def test_process_start_reads_proc(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "uptime").write_text("1000.50 2000.00\n")
    fields = ["S"] + ["0"] * 18 + [str(990 * hz)] + ["0"] * 10
    (proc / "self" / "stat").write_text(f"42 (py thon) {' '.join(fields)}\n")
    import time

    assert process_start(proc) == pytest.approx(time.time() - 10.5, abs=0.5)
    assert process_start(tmp_path / "missing") is None
    assert process_start() <= time.time()  # this very process, from the real /proc


# -- one real session ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def paused_session(tiny_model_dir, tmp_path_factory):
    """A real session in this process: tiny Llama, 25 s limit, a checkpoint every 2 s and no
    periodic eval; it pauses on its own (75)."""
    from baton.session.loop import SessionOptions, run_session

    folder = tmp_path_factory.mktemp("goodput")
    config = RunConfig.model_validate({
        "run": "g", "store": str(folder / "store"),
        "model": {"name": str(tiny_model_dir), "load_in_4bit": False},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(write_data(folder / "d.jsonl", n=40)), "eval": 0.25,
                 "max_seq_len": 32},
        "train": {"max_steps": 100000, "batch_size": 2, "micro_batch_size": 2,
                  "optimizer": "adamw", "warmup": 0.0},
        "checkpoint": {"every": "2s"}, "eval": {"every": "off", "max_records": 4},
        "session": {"limit": "25s"},
    })
    code = run_session(config, SessionOptions(workdir=folder / "work", log_every=1000.0))
    store = open_store(config.store)
    try:
        records = RunStore(store, "g").read_sessions()
    finally:
        store.close()
    return code, records, config


def test_session_parts_add_up_to_its_wall_clock(paused_session):
    code, records, _ = paused_session
    assert code == 75
    (rec,) = records
    t = rec.timings
    assert t is not None and t.wall >= 25.0
    assert abs(t.unaccounted) <= 0.02 * t.wall, t.parts()
    assert t.model_load > 0 and t.first_step > 0 and t.train > 0 and t.eval > 0
    assert t.final_commit > 0 and 0 < t.tail <= 12.0
    assert rec.goodput == pytest.approx(t.train / t.wall)


def test_checkpoints_never_evaluate(paused_session):
    """Checkpoints every 2 s (and the first, that times a commit): with `eval.every: off` the
    base eval before step 1 is the session's only eval."""
    _, (rec,), _ = paused_session
    assert len(rec.save_seconds) >= 2
    assert rec.eval_losses == [] and len(rec.eval_seconds) == 1
    assert rec.base_eval_loss is not None


def test_status_json_has_timings_goodput_and_gpu_hours(paused_session, capsys):
    from baton.session.status import status_main

    _, (rec,), config = paused_session
    assert status_main(config.store, "g", as_json=True, plot=None) == 0
    status = json.loads(capsys.readouterr().out)
    row = status["sessions"][0]
    assert set(row["timings"]) == set(PHASES) | {"wall"}
    assert row["goodput"] == pytest.approx(rec.goodput, abs=1e-4)
    assert row["tail_s"] == rec.timings.tail and status["goodput"] == row["goodput"]
    assert status["gpu_hours"] == {"total": 0, "by_kind": {}}  # a CPU session: no GPU-hours


# -- evals on their own schedule --------------------------------------------------------------

def test_auto_evals_take_a_fixed_share_of_the_session():
    clock = SessionClock(T0, None)
    evals = EvalSchedule("auto", clock, fallback_s=600.0)
    assert evals.interval_s() == 600.0  # cost unknown: the checkpoint interval
    evals.done(3.0, now=100.0)
    interval = evals.interval_s()
    assert interval == pytest.approx(3.0 / AUTO_SHARE) and 3.0 / (interval + 3.0) < 0.02
    assert not evals.due(now=100.0 + interval - 1) and evals.due(now=100.0 + interval + 1)


def test_step_and_off_schedules_and_the_finished_run():
    clock = SessionClock(T0, None)
    every3 = EvalSchedule("3 steps", clock, fallback_s=60.0)
    due = []
    for _ in range(7):
        every3.after_step()
        due.append(every3.due())
        if due[-1]:
            every3.done(1.0)
    assert due == [False, False, True, False, False, True, False]
    off = EvalSchedule("off", clock, fallback_s=60.0)
    off.after_step()
    assert not off.due() and off.due(finished=True)  # the final adapter is always measured


def test_no_eval_starts_without_room_before_the_deadline():
    import time

    clock = SessionClock(time.time() - 90.0, 100.0)  # 10 s left, less the margin
    evals = EvalSchedule("1 step", clock, fallback_s=60.0, cost_s=30.0)
    evals.after_step()
    assert not evals.due()


def test_eval_subset_is_fixed_by_the_seed():
    from baton.training.order import eval_subset

    first, again = eval_subset(1000, 200, seed=7), eval_subset(1000, 200, seed=7)
    assert first == again and len(first) == 200 and first == sorted(set(first))
    assert eval_subset(1000, 200, seed=8) != first
    assert eval_subset(50, 200, seed=7) == list(range(50)) == eval_subset(50, None, seed=7)


def test_eval_every_is_validated():
    from pydantic import ValidationError

    base = {"run": "r", "store": "s", "model": {"name": "m"}, "data": {"train": "d"}}
    for bad in ("0 steps", "sometimes", "-5m"):
        with pytest.raises(ValidationError, match="eval.every"):
            RunConfig.model_validate({**base, "eval": {"every": bad}})
    assert RunConfig.model_validate(base).eval.max_records == 200


# -- GPU-hours and plan's bill ------------------------------------------------------------------

def timed_record(sid: str, gpu: str, count: int, *, hours: float, train_share: float,
                 tail_s: float = 0.0, tokens: int = 0) -> SessionRecord:
    wall = hours * 3600 + tail_s
    ended = utcnow()
    return SessionRecord(session_id=sid, host="h", gpu=gpu, gpu_count=count,
                         started=ended - timedelta(hours=hours), ended=ended,
                         tokens=tokens, train_seconds=wall * train_share, end_step=10,
                         timings=SessionTimings(train=wall * train_share, tail=tail_s, wall=wall))


def test_gpu_hours_per_kind_and_run_goodput():
    records = [timed_record("a", "Tesla T4", 2, hours=3.0, train_share=0.9, tail_s=600),
               timed_record("b", "NVIDIA L4", 1, hours=1.5, train_share=0.8),
               timed_record("c", "cpu", 0, hours=1.0, train_share=0.5)]
    hours = gpu_hours(records)
    assert hours["by_kind"] == {"NVIDIA L4": 1.5, "Tesla T4": 6.0}  # the tail is not used
    assert hours["total"] == 7.5
    walls = [3 * 3600 + 600, 1.5 * 3600, 3600]
    trained = [walls[0] * 0.9, walls[1] * 0.8, walls[2] * 0.5]
    assert run_goodput(records) == pytest.approx(sum(trained) / sum(walls), abs=1e-4)


def test_estimate_bills_sessions_and_gpu_hours():
    bill = estimate(36_000_000, tokens_per_s=500.0, source="flag", goodput=0.9,
                    session_limit_s=12 * 3600, gpus=2)
    assert bill["train_hours"] == 20.0 and bill["session_hours"] == pytest.approx(22.22, abs=0.01)
    assert bill["sessions"] == 2 and bill["gpu_hours"] == pytest.approx(44.44, abs=0.01)
    assert bill["kaggle_weeks"] == pytest.approx(0.74, abs=0.01)


def test_plan_budget_from_the_runs_sessions_or_the_flag(tmp_path):
    store_dir = tmp_path / "store"
    config = RunConfig.model_validate({"run": "p", "store": str(store_dir),
                                       "model": {"name": "m"}, "data": {"train": "d"}})
    fresh = plan_budget(config, 100, 1000, None, 12 * 3600)
    assert "sessions" not in fresh and not store_dir.exists()  # nothing read, nothing made
    store = open_store(str(store_dir))
    try:
        RunStore(store, "p").write_session(timed_record(
            "a", "Tesla T4", 1, hours=2.0, train_share=0.95, tokens=3_600_000))
    finally:
        store.close()
    measured = plan_budget(config, 100, 1000, None, 12 * 3600)
    rate = 3_600_000 / (2 * 3600 * 0.95)
    assert measured["tokens_per_s"] == pytest.approx(rate)
    assert measured["goodput"] == 0.95 and measured["tokens_total"] == 100 * 360_000
    flagged = plan_budget(config, 100, 1000, 2000.0, 12 * 3600)
    assert flagged["tokens_per_s"] == 2000.0 and flagged["tokens_per_s_source"] == "--tokens-per-s"


def test_page_draws_one_bar_a_session(tmp_path):
    from baton.session.card import AdapterPlace, card_markdown
    from baton.session.goodput import plot_timings

    rows = [{"timings": timed_record("a", "T4", 1, hours=1, train_share=0.9).timings.model_dump()},
            {"timings": None}]
    png = plot_timings(rows, tmp_path / "time.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_timings([{"timings": None}], tmp_path / "none.png") is None
    status = {"run": "r", "state": "paused", "step": 1, "total_steps": 2, "goodput": 0.9,
              "gpu_hours": {"total": 1.0, "by_kind": {"T4": 1.0}}, "sessions": []}
    text = card_markdown(status, None, AdapterPlace(status), time_ref="r/time.png")
    assert "| goodput (training / wall-clock) | 90.0% |" in text
    assert "T4 1.00 h; total 1.00 h" in text and "(r/time.png)" in text
