"""The bounded kill test of CI: tests/killtest.py with a few kills on a folder and on S3.

The agent is SIGKILLed at each kind of kill point (inside a train step, mid checkpoint upload,
between the upload and HEAD's move, inside a lease renewal, at a random moment) and restarted
with --takeover. No committed checkpoint may be lost, every restart must resume from the HEAD
the kill left (verified, no fallback), and the run's final adapter must be bit-identical to an
uninterrupted run's (the optimizer state is checkpointed). `python tests/killtest.py` runs
the long version and prints the figures.
"""

from __future__ import annotations

import random

import pytest

from tests import killtest
from tests.agent_helpers import build_tiny_model, write_data

LOCAL_KILLS, S3_KILLS = 5, 3  # every kind of kill on the folder; the upload ones on S3
STEPS = 8 * LOCAL_KILLS  # enough that no single trial can run to the end before its kill


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("killtest")
    model = build_tiny_model(folder / "tiny")
    data = write_data(folder / "train.jsonl", n=64)
    return {"model": model, "data": data,
            "reference": killtest.baseline(folder / "baseline", model, data, STEPS)}


def check(report: "killtest.Report", kills: int) -> None:
    figures = report.summary()
    print(figures)  # shown with -s, and in the log of a failure
    trail = "\n".join(f"{t.kind} {t.killpoint} exit {t.code} resumed {t.resumed_from} "
                      f"last {t.last_step} HEAD {t.head_after}" for t in report.trials)
    assert figures["finished"], trail
    assert figures["committed_lost"] == 0, trail
    assert figures["kills"] == kills, f"every trial but the last must die by SIGKILL:\n{trail}"
    assert figures["resumes"] >= 1 and figures["resumes_ok"] == figures["resumes"], trail
    for trial in report.kills:
        if trial.killpoint:
            assert trial.hit_killpoint, f"{trial.killpoint} died elsewhere:\n{trial.tail}"
    heads = [t.head_after or 0 for t in report.trials]
    assert heads == sorted(heads), f"HEAD moved back across kills: {heads}"
    assert figures["final_matches_baseline"], "the final adapter differs from the uninterrupted run"


@pytest.mark.slow
def test_kills_on_a_local_store(setting, tmp_path):
    report = killtest.check_run(tmp_path, setting["model"], setting["data"],
                                str(tmp_path / "store"), STEPS, LOCAL_KILLS, random.Random(1),
                                setting["reference"])
    check(report, LOCAL_KILLS)
    assert {t.kind for t in report.kills} == set(killtest.KINDS)


@pytest.mark.slow
def test_kills_on_s3(setting, tmp_path, s3_server):
    report = killtest.check_run(tmp_path, setting["model"], setting["data"],
                                s3_server.new_bucket_uri(), STEPS, S3_KILLS, random.Random(2),
                                setting["reference"])
    check(report, S3_KILLS)
