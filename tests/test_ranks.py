"""The ranks of a multi-GPU session under torch's elastic launcher (session/launch.py).

`BATON_WORLD_SIZE=2` stands in for a 2-GPU machine: two CPU ranks over gloo, each started by
the launcher from tests/agent_entry.py, so the kill points of tests/faults.py reach every rank
and `BATON_KILLPOINT_RANK=1` picks the one that dies.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.agent_helpers import (ROOT, agent_command, agent_env, build_tiny_model, open_run,
                                 write_config, write_data)
from tests.faults import ANNOUNCE

DEAD_RANK_BOUND_S = 60  # the bound: a dead rank ends the session within a minute


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks-inputs")
    return {"model": build_tiny_model(folder / "tiny"), "data": write_data(folder / "train.jsonl")}


class TwoRankAgent:
    """`agent.py run` on two gloo ranks, its output read line by line with arrival times."""

    def __init__(self, config: Path, workdir: Path, **env: str):
        self.proc = subprocess.Popen(
            agent_command(config, workdir=workdir), cwd=ROOT,
            env=agent_env(BATON_WORLD_SIZE="2", **env), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: "queue.Queue[tuple[float, str | None]]" = queue.Queue()
        self.output: list[tuple[float, str]] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))
        self.lines.put((time.monotonic(), None))

    def wait_for(self, text: str, timeout: float = 300) -> float:
        """When the first line holding `text` arrived; AssertionError if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                at, line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append((at, line))
            if text in line:
                return at
        raise AssertionError(f"no line with {text!r}; output:\n{self.text()}")

    def finish(self, timeout: float = 300) -> tuple[int, float]:
        """(exit code, when it exited)."""
        code = self.proc.wait(timeout=timeout)
        ended = time.monotonic()
        while (item := self.lines.get(timeout=10))[1] is not None:
            self.output.append(item)
        return code, ended

    def text(self) -> str:
        return "".join(line for _, line in self.output)

    def timed(self, since: float) -> str:
        """The output with each line's arrival in seconds after `since` (for diagnosis)."""
        return "".join(f"{at - since:+7.2f} {line}" for at, line in self.output)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def config_for(tiny, tmp_path: Path, model: dict | None = None, **train) -> Path:
    return write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                        store=str(tmp_path / "store"), model=model or {},
                        train={"max_steps": 40, "batch_size": 2, "micro_batch_size": 1, **train})


def assert_head_is_complete_or_absent(uri: str, tmp_path: Path) -> None:
    """HEAD names a checkpoint that verifies (no fallback), or there is none yet."""
    from baton.handoff.checkpoint import pull_checkpoint

    runstore = open_run(uri)
    head = runstore.read_head()
    if head is None or head[0].checkpoint is None:
        return
    ref = pull_checkpoint(runstore, tmp_path / "pulled")
    assert ref is not None and ref.id == head[0].checkpoint and not ref.fell_back


def assert_lease_released(uri: str) -> None:
    lease = open_run(uri).read_lease()
    assert lease is not None, "rank 0 had taken the lease"
    assert lease[0].released, f"the lease is still held: {lease[0]}"


# -- a rank that dies ends the session -----------------------------------------------------

# fsdp: the NF4 base sharded over the two ranks (training/sharding.py, tests/test_sharding.py)
SHARDED = {"model": {"load_in_4bit": True}, "sharding": "fsdp"}


@pytest.mark.slow
@pytest.mark.parametrize("where, settings", [("step:2", {}), ("load", {}),
                                             ("step:2", SHARDED)], ids=["step", "load", "fsdp"])
def test_a_dead_rank_ends_the_session_within_a_minute(tiny, tmp_path, where, settings):
    """Rank 1 SIGKILLs itself (at its 2nd step, or while loading the model, as an OOM kill
    would; or at its 2nd step of a sharded session): exit 1, lease released, HEAD intact, well
    before any collective's timeout."""
    uri = str(tmp_path / "store")
    head_before = None
    agent = TwoRankAgent(config_for(tiny, tmp_path, **settings), tmp_path / "work",
                         BATON_KILLPOINT=where, BATON_KILLPOINT_RANK="1")
    try:
        killed_at = agent.wait_for(ANNOUNCE)
        head_before = open_run(uri).read_head()
        code, ended = agent.finish(timeout=DEAD_RANK_BOUND_S + 30)
    finally:
        agent.kill()
    seconds = ended - killed_at
    print(f"rank 1 killed at {where}: the agent exited {seconds:.1f} s later")
    print(agent.timed(killed_at))
    assert code == 1, agent.text()
    assert seconds < DEAD_RANK_BOUND_S, agent.text()
    assert "rank 1 of the session ended (killed by SIGKILL)" in agent.text()
    assert ("x2 ranks (FSDP)" in agent.text()) == bool(settings)
    assert_lease_released(uri)
    assert_head_is_complete_or_absent(uri, tmp_path)
    head_after = open_run(uri).read_head()
    if head_before is not None:  # never behind what was committed when rank 1 died
        assert head_after[0].step >= head_before[0].step


@pytest.mark.slow
def test_a_rank_0_stuck_with_a_dead_peer_is_killed_and_its_lease_released(tiny, tmp_path):
    """Over NCCL a collective with a dead peer can hang past any signal handler: rank 0 hangs
    at its 2nd step (BATON_HANG) while rank 1 dies there. torch's agent SIGKILLs rank 0 30 s
    after its SIGTERM, and the launcher releases the lease rank 0 held."""
    uri = str(tmp_path / "store")
    agent = TwoRankAgent(config_for(tiny, tmp_path), tmp_path / "work",
                         BATON_KILLPOINT="step:2", BATON_KILLPOINT_RANK="1",
                         BATON_HANG="step:2", BATON_HANG_RANK="0")
    try:
        killed_at = agent.wait_for(ANNOUNCE)
        code, ended = agent.finish(timeout=DEAD_RANK_BOUND_S + 30)
    finally:
        agent.kill()
    print(f"rank 0 stuck, rank 1 killed: the agent exited {ended - killed_at:.1f} s later")
    assert code == 1, agent.text()
    assert ended - killed_at < DEAD_RANK_BOUND_S, agent.text()
    assert "released the lease rank 0 held" in agent.text()
    assert_lease_released(uri)
    assert_head_is_complete_or_absent(uri, tmp_path)


# -- signals reach rank 0, which commits and pauses ------------------------------------------

@pytest.mark.slow
def test_sigterm_to_the_launcher_pauses_the_session_with_a_commit(tiny, tmp_path):
    uri = str(tmp_path / "store")
    agent = TwoRankAgent(config_for(tiny, tmp_path, max_steps=10_000), tmp_path / "work")
    try:
        agent.wait_for("x2 ranks (DDP)")
        agent.wait_for("step 3/")  # a few steps in (progress lines at --log-every 0)
        agent.proc.send_signal(signal.SIGTERM)
        code, _ = agent.finish(timeout=120)
    finally:
        agent.kill()
    assert code == 75, agent.text()
    assert "paused (signal)" in agent.text()
    head = open_run(uri).read_head()[0]
    assert head.step >= 3
    assert_lease_released(uri)
    assert_head_is_complete_or_absent(uri, tmp_path)


@pytest.mark.slow
def test_rank_0s_exit_code_is_the_sessions(tiny, tmp_path):
    """Another agent holds the lease: rank 0 exits 73 before any plan, the follower is told to
    stop, and the launcher returns 73 (not a launcher failure)."""
    from baton.handoff.lease import LeaseManager

    uri = str(tmp_path / "store")
    config = config_for(tiny, tmp_path)
    LeaseManager(open_run(uri), holder="someone-else", ttl=600).acquire()
    agent = TwoRankAgent(config, tmp_path / "work")
    try:
        code, _ = agent.finish(timeout=240)
    finally:
        agent.kill()
    assert code == 73, agent.text()
    assert "rank 1 of the session ended" not in agent.text()


# -- the launcher's parts ------------------------------------------------------------------

@pytest.mark.parametrize("body, code", [("import sys; sys.exit(75)", 75), ("x = 1", 0),
                                         ("import sys; sys.exit('bad')", 1),
                                         ("raise SystemExit(None)", 0)])
def test_a_rank_returns_its_scripts_exit_code(tmp_path, body, code):
    from baton.session.launch import run_script

    script = tmp_path / "entry.py"
    script.write_text(body + "\n")
    assert run_script(str(script), ["run"]) == code


def test_the_launcher_releases_only_its_own_abandoned_lease(tmp_path):
    from baton.handoff.lease import LeaseManager
    from baton.session.launch import release_abandoned_lease

    uri = str(tmp_path / "store")
    lease = LeaseManager(open_run(uri), holder="rank0-holder", ttl=600)
    lease.acquire()  # and never released: rank 0 was killed
    assert not release_abandoned_lease(uri, "t", "someone-else")
    assert not open_run(uri).read_lease()[0].released
    assert release_abandoned_lease(uri, "t", "rank0-holder")
    assert open_run(uri).read_lease()[0].released
    assert not release_abandoned_lease(uri, "t", "rank0-holder"), "already released"


@pytest.mark.parametrize("flagged", [True, False])
def test_ranks_start_from_an_entry_script_only_when_it_says_so(monkeypatch, flagged):
    """tests/agent_entry.py says AGENT_ENTRY = True, so its hooks reach every rank; any other
    __main__ (pytest, a notebook) gets agent.py itself."""
    import types

    import agent

    main = types.ModuleType("__main__")
    main.__file__ = str(ROOT / "tests" / "agent_entry.py")
    if flagged:
        main.AGENT_ENTRY = True
    monkeypatch.setitem(sys.modules, "__main__", main)
    want = main.__file__ if flagged else str(ROOT / "agent.py")
    assert agent.entry_script() == want


# -- the followers outwait a slow pull ----------------------------------------------------

def test_followers_outwait_a_pull_longer_than_the_collective_timeout(tmp_path):
    """Two gloo ranks, the collectives' timeout cut to 1 s, rank 0's pull made to take 3 s
    (tests/words_worker.py): on the default group the follower times out, as a follower
    behind NCCL's 10-minute watchdog would; over the words' own group it hears the plan."""
    from tests.ddp_worker import free_port

    pull_s, collective_s = 3.0, 1.0
    env = agent_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "words_worker.py"), str(pull_s), str(collective_s),
         str(tmp_path / f"rank{rank}.json")], cwd=ROOT, env={**env, "RANK": str(rank),
                                                             "LOCAL_RANK": str(rank)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(outputs)
    follower = json.loads((tmp_path / "rank1.json").read_text())
    print(follower)
    assert follower["sum"] == 2.0, "the default group carries the tensor collectives"
    assert "Timed out" in follower["default_group"]
    assert collective_s <= follower["default_group_s"] < pull_s
    assert follower["plan"] == {"plan": "spec, data, checkpoint"}
    assert follower["plan_s"] >= pull_s > collective_s and follower["last_word"] == "stop"


def test_a_follower_waits_as_long_as_the_session_may_last(monkeypatch):
    from baton.state_schema import RunConfig
    from baton.session.codes import DEFAULT_SESSION_LIMIT_S
    from baton.session.ranks import WORD_SLACK_S, word_wait_s

    for name in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "COLAB_RELEASE_TAG", "COLAB_GPU",
                 "COLAB_BACKEND_VERSION"):
        monkeypatch.delenv(name, raising=False)
    base = {"run": "t", "store": "/tmp/s", "model": {"name": "m"}, "data": {"train": "d.jsonl"},
            "train": {"max_steps": 1}}
    assert word_wait_s(RunConfig.model_validate({**base, "session": {"limit": "9h"}})) == \
        9 * 3600 + WORD_SLACK_S
    assert word_wait_s(RunConfig.model_validate(base)) == DEFAULT_SESSION_LIMIT_S + WORD_SLACK_S
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")  # Kaggle's 12 h
    assert word_wait_s(RunConfig.model_validate(base)) == 12 * 3600 + WORD_SLACK_S
