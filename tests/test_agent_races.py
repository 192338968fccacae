"""Whole agents racing for one run: a crowd started at once, and a stale agent that wakes up.

These drive `agent.py run` itself (tests/test_races.py races the lease and commit functions in
small worker processes). What must hold: exactly one agent trains at a time, the others exit
73 having changed nothing, and an agent that slept through the loss of its lease exits 1 with
a message and never commits over its successor.
"""

from __future__ import annotations

import signal
import time

import pytest

from baton.handoff.runstore import parse_checkpoint_id
from baton.state_schema import utcnow
from tests.agent_helpers import RunningAgent, build_tiny_model, open_run, write_config, \
    write_data

CROWD = 4  # agents started at once; two CPU cores make more of them slow, not more racy
TRAINING = r"^run 't': step (\d+)/\d+ on .* lease generation (\d+)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent-races")
    return {"model": build_tiny_model(folder / "tiny"), "data": write_data(folder / "train.jsonl")}


def long_config(tiny, tmp_path, uri: str):
    return write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri,
                        train={"max_steps": 10_000}, checkpoint={"every": "1s", "keep": 3})


def stop_all(agents: list[RunningAgent]) -> None:
    for agent in agents:
        if agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGCONT)
        agent.kill()


@pytest.mark.slow
def test_crowd_of_agents_one_trains_the_rest_exit_73(tiny, tmp_path):
    uri = str(tmp_path / "store")
    config = long_config(tiny, tmp_path, uri)
    agents = [RunningAgent(config, workdir=tmp_path / f"work{i}") for i in range(CROWD)]
    try:
        outcomes = [_outcome(a) for a in agents]
        winners = [a for a, o in zip(agents, outcomes) if o == "training"]
        assert len(winners) == 1, f"exactly one agent trains, got {outcomes}: " + \
            "\n---\n".join(a.text()[-800:] for a in agents)
        losers = {i: a.finish(timeout=300) for i, a in enumerate(agents) if a not in winners}
        winners[0].wait_for(r"^step 2/")
        winners[0].proc.send_signal(signal.SIGTERM)
        assert winners[0].finish() == 75, winners[0].text()
    finally:
        stop_all(agents)
    assert set(losers.values()) == {73}, losers
    for i in losers:
        text = flat(agents[i].text())
        assert "is held by agent" in text and "--takeover" in text, text
        assert "run 't': step" not in text, "a loser must not have started training"
    records = open_run(uri).read_sessions()
    assert len(records) == 1 and records[0].exit_code == 75
    head = open_run(uri).read_head()[0]
    assert head.generation == 1 and head.step >= 2, "one lease taken, once"


def flat(text: str) -> str:
    """Messages are wrapped to the console's width: compare them as one line."""
    return " ".join(text.split())


def _outcome(agent: RunningAgent) -> str:
    """'training', 'held' (it said the lease is held) or 'exited' (neither, then exited)."""
    try:
        match = agent.wait_for(TRAINING + "|is held by", timeout=300)
    except AssertionError:
        return "exited"
    return "held" if "is held by" in match.string else "training"


@pytest.mark.slow
def test_stale_agent_wakes_after_its_lease_was_taken(tiny, tmp_path, s3_server):
    """A is paused (SIGSTOP: a suspended VM) until its lease expires; B takes the run; A
    wakes (SIGCONT) with a checkpoint in hand. A must exit 1 with a message and commit
    nothing; B goes on and pauses normally. S3, since a local store's lock file would make
    B wait for the frozen A, which no two machines do."""
    uri = s3_server.new_bucket_uri()
    config = long_config(tiny, tmp_path, uri)
    stale = RunningAgent(config, workdir=tmp_path / "work-a", lease_ttl=4)
    agents = [stale]
    try:
        old_generation = int(stale.wait_for(TRAINING).group(2))
        stale.wait_for(r"^step 3/")
        stale.proc.send_signal(signal.SIGSTOP)
        _wait_until_lease_expired(uri)
        successor = RunningAgent(config, workdir=tmp_path / "work-b")
        agents.append(successor)
        match = successor.wait_for(TRAINING)
        resumed, new_generation = int(match.group(1)), int(match.group(2))
        stale.proc.send_signal(signal.SIGCONT)
        stale_code = stale.finish(timeout=120)
        successor.wait_for(rf"^step {resumed + 2}/")
        successor.proc.send_signal(signal.SIGTERM)
        successor_code = successor.finish()
    finally:
        stop_all(agents)
    assert new_generation > old_generation
    assert stale_code == 1, stale.text()
    assert "owns run 't' now" in flat(stale.text())
    assert "without writing anything" in flat(stale.text())
    assert successor_code == 75, successor.text()
    runstore = open_run(uri)
    head = runstore.read_head()[0]
    assert head.generation == new_generation and head.checkpoint.endswith(f"-g{new_generation}")
    for cid in runstore.list_checkpoints():
        step, generation = parse_checkpoint_id(cid)
        assert generation == new_generation or step <= resumed, \
            f"{cid}: a stale generation's checkpoint past the successor's start was kept"
    records = {r.exit_code for r in runstore.read_sessions()}
    assert records == {None, 75}, "the fenced agent leaves its record unfinished"


def _wait_until_lease_expired(uri: str, timeout: float = 60) -> None:
    runstore = open_run(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lease = runstore.read_lease()[0]
        if not lease.live(utcnow()):
            return
        time.sleep(0.25)
    raise AssertionError("the paused agent's lease never expired")
