"""Races between real agent processes (tests/race_worker.py), on every backend.

Threads would share one client and one interpreter lock; separate processes race the way two
notebooks on two machines do: through the store's conditional writes alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from baton.handoff.checkpoint import checkpoint_id, commit_checkpoint, pull_checkpoint
from baton.handoff.lease import LeaseManager
from baton.handoff.runstore import RunStore
from baton.state_schema import utcnow
from tests.store_helpers import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 8
PROCESS_SECONDS = 180  # only stops a hung worker from hanging the suite; asserts nothing
RUN = "race-run"


def worker(mode: str, store_uri: str, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.race_worker", mode, "--store", store_uri,
               "--run", RUN, *args]
    return subprocess.Popen(command, cwd=ROOT, env=dict(os.environ), stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, list[dict]]:
    out, err = proc.communicate(timeout=PROCESS_SECONDS)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 73, 74, -signal.SIGKILL):
        pytest.fail(f"worker failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode, lines


def wait_for_files(paths: list[Path], procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + PROCESS_SECONDS
    while not all(p.exists() for p in paths):
        dead = [p for p in procs if p.poll() not in (None, 0)]
        if dead or time.monotonic() > deadline:
            pytest.fail(f"workers never reached the barrier: {dead[0].stderr.read()[-3000:]}"
                        if dead else "workers never reached the barrier")
        time.sleep(0.01)


def digest_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def runstore(store):
    return RunStore(store, RUN)


@pytest.mark.parametrize("before", ["absent", "expired"])
def test_eight_processes_one_lease_winner(store_uri, runstore, tmp_path, before):
    """All 8 read the same lease state, then write on condition: exactly one wins."""
    expected_generation = 1
    if before != "absent":
        LeaseManager(runstore, holder="old", clock=lambda: utcnow().replace(year=2000)).acquire()
        expected_generation = 2
    procs = [worker("acquire", store_uri, "--holder", f"w{i}", "--barrier", str(tmp_path))
             for i in range(WORKERS)]
    wait_for_files([tmp_path / f"ready-w{i}" for i in range(WORKERS)], procs)
    (tmp_path / "go").touch()
    outcomes = [finish(p)[1][0] for p in procs]
    winners = [o for o in outcomes if o["result"] == "won"]
    assert len(winners) == 1, outcomes
    assert all(o["result"] == "held" and o["by"] == winners[0]["holder"]
               for o in outcomes if o is not winners[0]), outcomes
    lease, _ = runstore.read_lease()
    head, _ = runstore.read_head()
    assert lease.holder == winners[0]["holder"]
    assert lease.generation == head.generation == winners[0]["generation"] == expected_generation


def test_fenced_process_cannot_commit_after_takeover(store_uri, runstore, tmp_path):
    """A (another process, generation 1) is taken over by B before either commits: A's commit
    is refused, HEAD stays B's, A's renew fails; then B commits and A is still refused."""
    src = make_checkpoint(tmp_path / "a-src", 50)
    a = worker("hold", store_uri, "--holder", "a", "--barrier", str(tmp_path),
               "--src", str(src), "--step", "50")
    first = json.loads(a.stdout.readline() or "{}")
    assert first.get("result") == "acquired" and first["generation"] == 1, a.stderr.read()
    b = LeaseManager(runstore, holder="b")
    assert b.acquire(takeover=True).generation == 2
    head_before = runstore.read_head()
    (tmp_path / "go").touch()
    _, lines = finish(a)
    assert lines == [{"holder": "a", "commit": "fenced", "renew": "lost"}]
    assert runstore.read_head() == head_before
    assert runstore.list_checkpoints() == []
    cid = commit_checkpoint(runstore, make_checkpoint(tmp_path / "b-src", 40), step=40,
                            generation=b.generation)
    assert runstore.read_head()[0].checkpoint == cid


@pytest.mark.parametrize("kill_after", [2, 4], ids=["mid-files", "before-manifest"])
def test_process_killed_inside_upload_leaves_head_on_last_good(store_uri, runstore, tmp_path,
                                                               kill_after):
    good_src = make_checkpoint(tmp_path / "good", 10)
    good = commit_checkpoint(runstore, good_src, step=10, generation=1)
    cut_src = make_checkpoint(tmp_path / "cut", 20)
    proc = worker("cut", store_uri, "--src", str(cut_src), "--step", "20",
                  "--generation", "1", "--kill-after", str(kill_after))
    code, lines = finish(proc)
    assert code == -signal.SIGKILL and lines == []
    cut = checkpoint_id(20, 1)
    assert cut in runstore.list_checkpoints()  # some files landed ...
    assert runstore.read_manifest(cut) is None  # ... but never the manifest
    assert runstore.read_head()[0].checkpoint == good
    ref = pull_checkpoint(runstore, tmp_path / "pulled")
    assert ref.id == good and not ref.fell_back
    assert digest_tree(ref.path) == digest_tree(good_src)
    # The next session commits over the debris and pulls its own checkpoint.
    again = commit_checkpoint(runstore, cut_src, step=20, generation=2)
    assert runstore.read_head()[0].previous == good
    assert digest_tree(pull_checkpoint(runstore, tmp_path / "next").path) == digest_tree(cut_src)
    assert again == checkpoint_id(20, 2)


def test_commit_racing_a_takeover_never_lands_after_it(store_uri, runstore, tmp_path):
    """A (generation 1, another process) commits at the moment B takes over. Either A's commit
    landed before B stamped generation 2 into HEAD (then HEAD names it and B continues from
    it), or it is fenced and leaves nothing; never does it land on top of B's generation."""
    src = make_checkpoint(tmp_path / "a-src", 50)
    a = worker("hold", store_uri, "--holder", "a", "--barrier", str(tmp_path),
               "--src", str(src), "--step", "50")
    assert json.loads(a.stdout.readline() or "{}").get("result") == "acquired", a.stderr.read()
    (tmp_path / "go").touch()
    b = LeaseManager(runstore, holder="b")
    b.acquire(takeover=True)
    _, lines = finish(a)
    head, _ = runstore.read_head()
    assert head.generation == b.generation == 2
    assert runstore.read_lease()[0].holder == "b"
    if lines[0]["commit"] == "fenced":
        # B's stamp came before A's commit, so B's lease write did too: A's renew must fail.
        assert lines[0]["renew"] == "lost"
        assert head.checkpoint is None and runstore.list_checkpoints() == []
    else:
        assert head.checkpoint == lines[0]["commit"] == checkpoint_id(50, 1)
        assert digest_tree(pull_checkpoint(runstore, tmp_path / "p").path) == digest_tree(src)
    mine = commit_checkpoint(runstore, make_checkpoint(tmp_path / "b-src", 60), step=60,
                             generation=b.generation)
    assert runstore.read_head()[0].checkpoint == mine
