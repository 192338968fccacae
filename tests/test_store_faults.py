"""Store faults through a fault-injecting proxy in front of SeaweedFS, and the local spool.

Resets, 500s, 503 SlowDown, stalls past the read timeout and truncated bodies are retried;
faults that outlast the retries end the call with a message, and HEAD never names a broken
checkpoint. When the store stays down at the deadline, the last checkpoint is spooled on the
local disk and pushed by the next session that reaches the store (handoff/spool.py).
"""

from __future__ import annotations

import os
from typing import Optional
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from baton.handoff import Store, open_store, s3
from baton.handoff.retry import RetryPolicy
from baton.handoff.checkpoint import commit_checkpoint, pull_checkpoint
from baton.handoff.errors import CorruptCheckpointError, FencedError, StoreUnavailableError
from baton.handoff.lease import LeaseManager
from baton.handoff.runstore import RunStore
from baton.handoff.spool import pending, push_pending, spool

from tests.servers.fault_proxy import FaultProxy
from tests.store_helpers import make_checkpoint

RUN = "t"


@pytest.fixture
def proxy(s3_server):
    endpoint = urlparse(s3_server.endpoint)
    fault_proxy = FaultProxy(endpoint.hostname, endpoint.port).start()
    yield fault_proxy
    fault_proxy.stop()


@pytest.fixture
def proxied(proxy, s3_server, monkeypatch):
    """A RunStore on a fresh bucket, reached through the proxy, with quick retries and a read
    timeout short enough for a stall to pass it."""
    monkeypatch.setattr(Store, "retry", RetryPolicy(attempts=4, max_seconds=30.0))
    monkeypatch.setattr(s3, "READ_TIMEOUT", 1)
    uri = s3_server.new_bucket_uri()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    store = open_store(uri)
    yield RunStore(store, RUN)
    store.close()


def on(method: str, fragment: str):
    return lambda m, p: m == method and fragment in p


def hits(proxy: FaultProxy, kind: str) -> int:
    return sum(1 for _, _, outcome in proxy.log if outcome == kind)


# -- transient faults are ridden out ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["reset", "500", "503", "stall", "truncate"])
def test_transient_fault_on_every_kind_of_call_is_retried(proxied, proxy, tmp_path, kind):
    """One fault of each kind on the lease write, a checkpoint upload, HEAD's move and the
    reads of a pull: the commit and the pull succeed, and the pulled files verify."""
    lease = LeaseManager(proxied, ttl=60)
    lease.acquire()
    for method, fragment in [("PUT", "lease.json"), ("PUT", "/checkpoints/"),
                             ("PUT", "HEAD.json"), ("GET", "manifest.json"),
                             ("GET", "adapter_model")]:
        proxy.inject(kind, times=1, match=on(method, fragment), stall_s=3)
    lease.renew()
    cid = commit_checkpoint(proxied, make_checkpoint(tmp_path / "c", 5), step=5,
                            generation=lease.generation)
    ref = pull_checkpoint(proxied, tmp_path / "pulled")
    assert ref.id == cid and not ref.fell_back
    assert (ref.path / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "c" / "adapter_model.safetensors").read_bytes()
    assert hits(proxy, kind) >= 4, proxy.log


def test_faults_outlasting_retries_leave_head_on_the_last_good_checkpoint(proxied, proxy,
                                                                           tmp_path):
    lease = LeaseManager(proxied, ttl=60)
    lease.acquire()
    good = commit_checkpoint(proxied, make_checkpoint(tmp_path / "a", 2), step=2,
                             generation=lease.generation)
    proxy.inject("503", times=-1, match=on("PUT", "manifest.json"))
    with pytest.raises(StoreUnavailableError) as failure:
        commit_checkpoint(proxied, make_checkpoint(tmp_path / "b", 4), step=4,
                          generation=lease.generation)
    message = str(failure.value)
    assert "kept failing" in message and "AWS_ENDPOINT_URL" in message
    assert proxied.store.endpoint in message
    proxy.clear()
    head = proxied.read_head()[0]
    assert head.checkpoint == good and head.step == 2
    ref = pull_checkpoint(proxied, tmp_path / "pulled")
    assert ref.id == good and not ref.fell_back


def test_truncated_body_is_never_taken_for_the_object(proxied, proxy):
    proxied.store.write(f"{RUN}/note.json", b'{"a": "' + b"x" * 2000 + b'"}')
    proxy.inject("truncate", times=2, match=on("GET", "note.json"))
    assert proxied.store.read(f"{RUN}/note.json").data.endswith(b'"}')
    assert hits(proxy, "truncate") == 2


# -- the spool -------------------------------------------------------------------------------

@pytest.fixture
def local_run(tmp_path):
    store = open_store(str(tmp_path / "store"))
    yield RunStore(store, RUN)
    store.close()


def test_spooled_checkpoint_is_pushed_under_the_new_generation(local_run, tmp_path):
    first = LeaseManager(local_run, ttl=60)
    first.acquire()
    commit_checkpoint(local_run, make_checkpoint(tmp_path / "a", 2), step=2,
                      generation=first.generation)
    saved = make_checkpoint(tmp_path / "b", 6)
    spooled = spool(saved, tmp_path / "work", RUN, 6, first.generation,
                    store=local_run.store.uri)
    assert [s.id for s in pending(tmp_path / "work", RUN)] == [spooled.id]

    second = LeaseManager(local_run, ttl=60)
    second.acquire(takeover=True)
    pushed = push_pending(local_run, tmp_path / "work", second.generation)
    assert pushed == [f"00000006-g{second.generation}"]
    head = local_run.read_head()[0]
    assert head.checkpoint == pushed[0] and head.generation == second.generation
    ref = pull_checkpoint(local_run, tmp_path / "pulled")
    assert (ref.path / "adapter_model.safetensors").read_bytes() == \
        (saved / "adapter_model.safetensors").read_bytes()
    assert not (ref.path / "spool.json").exists()
    assert pending(tmp_path / "work", RUN) == []


def test_spooled_checkpoint_behind_head_is_dropped(local_run, tmp_path):
    lease = LeaseManager(local_run, ttl=60)
    lease.acquire()
    spool(make_checkpoint(tmp_path / "old", 3), tmp_path / "work", RUN, 3, lease.generation)
    commit_checkpoint(local_run, make_checkpoint(tmp_path / "a", 5), step=5,
                      generation=lease.generation)
    before = local_run.read_head()
    assert push_pending(local_run, tmp_path / "work", lease.generation) == []
    assert local_run.read_head() == before
    assert pending(tmp_path / "work", RUN) == []


def test_spool_is_kept_when_a_newer_generation_owns_the_run(local_run, tmp_path):
    ours = LeaseManager(local_run, ttl=60)
    ours.acquire()
    spool(make_checkpoint(tmp_path / "b", 4), tmp_path / "work", RUN, 4, ours.generation)
    LeaseManager(local_run, holder="successor", ttl=60).acquire(takeover=True)
    with pytest.raises(FencedError):
        push_pending(local_run, tmp_path / "work", ours.generation)
    assert local_run.read_head()[0].checkpoint is None
    assert [s.step for s in pending(tmp_path / "work", RUN)] == [4]


def test_altered_spool_is_refused_and_other_stores_spools_are_ignored(local_run, tmp_path):
    lease = LeaseManager(local_run, ttl=60)
    lease.acquire()
    spool(make_checkpoint(tmp_path / "x", 4), tmp_path / "elsewhere", RUN, 4, 1,
          store="s3://another-bucket/runs")
    assert push_pending(local_run, tmp_path / "elsewhere", lease.generation) == []
    spooled = spool(make_checkpoint(tmp_path / "b", 4), tmp_path / "work", RUN, 4, 1)
    (spooled.path / "adapter_model.safetensors").write_bytes(b"cut short")
    with pytest.raises(CorruptCheckpointError, match="missing or altered"):
        push_pending(local_run, tmp_path / "work", lease.generation)
    assert local_run.read_head()[0].checkpoint is None


# -- the agent through the proxy ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.agent_helpers import build_tiny_model, write_data

    folder = tmp_path_factory.mktemp("store-faults")
    return {"model": build_tiny_model(folder / "tiny"), "data": write_data(folder / "train.jsonl")}


def agent_through(proxy: FaultProxy, config: Path, workdir: Path, *flags: str,
                  lease_ttl: Optional[float] = None):
    from tests.agent_helpers import RunningAgent

    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = proxy.url  # RunningAgent copies os.environ
    try:
        return RunningAgent(config, *flags, workdir=workdir, lease_ttl=lease_ttl)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = previous


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_agent_rides_out_transient_faults(tiny, tmp_path, s3_server, proxy):
    from tests.agent_helpers import open_run, write_config

    uri = s3_server.new_bucket_uri()
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri,
                          train={"max_steps": 4}, checkpoint={"every": "1s", "keep": 3})
    proxy.inject("reset", times=2, match=on("PUT", "/checkpoints/"))
    proxy.inject("503", times=2, match=on("PUT", "HEAD.json"))
    proxy.inject("500", times=2, match=on("PUT", "lease.json"))
    proxy.inject("truncate", times=1, match=on("GET", "HEAD.json"))
    agent = agent_through(proxy, config, tmp_path / "work")
    try:
        code = agent.finish(timeout=300)
    finally:
        agent.kill()
    assert code == 0, agent.text()[-3000:]
    assert {kind: hits(proxy, kind) for kind in ("reset", "503", "500", "truncate")} == \
        {"reset": 2, "503": 2, "500": 2, "truncate": 1}
    runstore = open_run(uri)
    head = runstore.read_head()[0]
    assert head.finished and head.step == 4
    ref = pull_checkpoint(runstore, tmp_path / "pulled")
    assert ref.id == head.checkpoint and not ref.fell_back


def _wait_for_a_commit(runstore, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        got = runstore.read_head()
        if got is not None and got[0].checkpoint is not None:
            return
        time.sleep(0.1)
    raise AssertionError("the agent committed no checkpoint within the timeout")


@pytest.mark.slow
def test_store_down_at_the_deadline_spools_and_next_session_pushes(tiny, tmp_path, s3_server,
                                                                   proxy):
    """The store stops answering mid-session and stays down past the deadline: the agent keeps
    its last checkpoint in the local spool, says so, and exits 1 with HEAD on an intact
    checkpoint. The next session from the same workdir pushes it and resumes from it."""
    from tests.agent_helpers import open_run, write_config

    uri = s3_server.new_bucket_uri()
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri,
                          train={"max_steps": 10_000}, checkpoint={"every": "1s", "keep": 3})
    agent = agent_through(proxy, config, tmp_path / "work", "--session-start", "now",
                          "--session-limit", "60s", lease_ttl=6)
    try:
        agent.wait_for(r"^step 3/")
        _wait_for_a_commit(open_run(uri))  # the outage must strike after HEAD names one
        proxy.inject("reset", times=-1)  # every request, until cleared
        code = agent.finish(timeout=300)
    finally:
        agent.kill()
    proxy.clear()
    text = flat(agent.text())
    assert code == 1, agent.text()[-3000:]
    assert "kept on this machine" in text and "NOT committed" in text, text[-3000:]
    spooled = pending(tmp_path / "work", RUN)
    assert len(spooled) == 1
    runstore = open_run(uri)
    head = runstore.read_head()[0]
    assert head.step < spooled[0].step
    assert pull_checkpoint(runstore, tmp_path / "pulled").id == head.checkpoint

    nxt = agent_through(proxy, config, tmp_path / "work", "--takeover",
                        "--session-start", "now", "--session-limit", "60s")
    try:
        match = nxt.wait_for(r"^run 't': step (\d+)/")
        nxt.proc.send_signal(signal.SIGTERM)
        assert nxt.finish() == 75, nxt.text()[-3000:]
    finally:
        nxt.kill()
    assert int(match.group(1)) == spooled[0].step
    assert pending(tmp_path / "work", RUN) == []
