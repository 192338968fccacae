"""The lease on every backend: acquire, refuse a live holder, expiry, takeover, renew, release,
heartbeat. Expiry uses an injected clock, so nothing waits on wall time."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from baton.handoff import ConflictError, StoreUnavailableError
from baton.handoff.lease import LeaseHeldError, LeaseLostError, LeaseManager
from baton.handoff.runstore import RunStore
from baton.state_schema import utcnow


class Clock:
    """A settable clock shared by several agents, for expiry without sleeping."""

    def __init__(self):
        self.now = utcnow()
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += timedelta(seconds=seconds)


@pytest.fixture
def runstore(store):
    return RunStore(store, "lease-run")


def agent(runstore, name, clock=None, ttl=60.0):
    return LeaseManager(runstore, holder=name, host=f"host-{name}", gpu="T4", ttl=ttl,
                        clock=clock or utcnow)


def test_acquire_absent_lease_writes_generation_into_head(runstore):
    lease = agent(runstore, "a").acquire()
    assert lease.generation == 1 and lease.holder == "a" and not lease.released
    stored, _ = runstore.read_lease()
    assert stored.holder == "a" and stored.host == "host-a" and stored.gpu == "T4"
    head, _ = runstore.read_head()
    assert head.generation == 1 and head.checkpoint is None


def test_live_lease_is_refused_and_nothing_written(runstore):
    agent(runstore, "a").acquire()
    before_lease, before_head = runstore.read_lease(), runstore.read_head()
    with pytest.raises(LeaseHeldError) as info:
        agent(runstore, "b").acquire()
    assert info.value.lease.holder == "a"
    assert "--takeover" in str(info.value) and "host-a" in str(info.value)
    assert runstore.read_lease()[1] == before_lease[1]
    assert runstore.read_head()[1] == before_head[1]


def test_expired_lease_is_taken_without_takeover(runstore):
    clock = Clock()
    a, b = agent(runstore, "a", clock, ttl=30), agent(runstore, "b", clock, ttl=30)
    a.acquire()
    clock.advance(29)
    with pytest.raises(LeaseHeldError):
        b.acquire()
    clock.advance(2)
    assert b.acquire().generation == 2
    assert runstore.read_head()[0].generation == 2
    with pytest.raises(LeaseLostError):
        a.renew()


def test_takeover_of_live_lease_raises_generation(runstore):
    a, b = agent(runstore, "a"), agent(runstore, "b")
    a.acquire()
    lease = b.acquire(takeover=True)
    assert lease.generation == 2 and runstore.read_lease()[0].holder == "b"
    assert runstore.read_head()[0].generation == 2
    with pytest.raises(LeaseLostError, match="held by agent b"):
        a.renew()
    a.release()  # lost: a no-op that must not clobber b's lease
    assert runstore.read_lease()[0].holder == "b" and not runstore.read_lease()[0].released


def test_renew_extends_expiry(runstore):
    clock = Clock()
    a = agent(runstore, "a", clock, ttl=10)
    first = a.acquire()
    for _ in range(5):
        clock.advance(8)
        renewed = a.renew()
    assert renewed.expires_at == first.expires_at + timedelta(seconds=40)
    assert runstore.read_lease()[0].expires_at == renewed.expires_at
    with pytest.raises(LeaseHeldError):  # 40 s past the first expiry, still live
        agent(runstore, "b", clock, ttl=10).acquire()


def test_release_makes_lease_acquirable_at_once(runstore):
    a = agent(runstore, "a")
    a.acquire()
    a.release()
    assert runstore.read_lease()[0].released
    assert agent(runstore, "b").acquire().generation == 2
    with pytest.raises(LeaseLostError):
        a.renew()


def test_generation_continues_from_head_when_lease_file_is_gone(runstore):
    """A deleted lease.json must not reset generations below what HEAD already carries."""
    a = agent(runstore, "a")
    a.acquire()
    a.release()
    agent(runstore, "b").acquire()
    runstore.store.delete(runstore.key("lease.json"))
    assert agent(runstore, "c").acquire().generation == 3


def test_heartbeat_survives_many_renewals(runstore):
    a = agent(runstore, "a", ttl=30)
    a.acquire()
    a.start_heartbeat(0.01)
    wait_for(lambda: a.renewals >= 15 or a.lost is not None)
    a.stop_heartbeat()
    assert a.lost is None and a.renewals >= 15
    a.check()  # no loss recorded: does not raise
    stored, _ = runstore.read_lease()
    assert stored.holder == "a" and stored.renewed_at == a.lease.renewed_at
    a.release()
    assert agent(runstore, "b").acquire().generation == 2


def test_heartbeat_records_loss_after_takeover(runstore):
    """A paused VM wakes up after a takeover: its next heartbeat finds the lease gone.
    (The heartbeat starts after the takeover so that the outcome does not hang on timing.)"""
    a = agent(runstore, "a", ttl=30)
    a.acquire()
    agent(runstore, "b").acquire(takeover=True)
    a.start_heartbeat(0.01)
    wait_for(lambda: a.lost is not None)
    a.stop_heartbeat()
    assert isinstance(a.lost, LeaseLostError)
    with pytest.raises(LeaseLostError):
        a.check()
    assert runstore.read_lease()[0].holder == "b"


def test_heartbeat_passes_a_bug_to_the_training_thread(runstore, monkeypatch):
    """An outage is retried at the next beat; a bug is not swallowed: the heartbeat ends and
    check() raises it where the training loop will see it."""
    a = agent(runstore, "a", ttl=30)
    a.acquire()
    calls = []

    def renew():
        calls.append(1)
        if len(calls) == 1:
            raise StoreUnavailableError("store down (test)")
        raise TypeError("a bug (test)")

    monkeypatch.setattr(a, "renew", renew)
    monkeypatch.setattr(threading, "excepthook", lambda _args: None)  # expected: quiet
    a.start_heartbeat(0.01)
    wait_for(lambda: a.failure is not None)
    assert len(calls) == 2 and a.lost is None
    with pytest.raises(TypeError, match="a bug"):
        a.check()
    a.stop_heartbeat()


def test_heartbeat_interval_must_be_below_ttl(runstore):
    a = agent(runstore, "a", ttl=5)
    a.acquire()
    with pytest.raises(ValueError, match="interval"):
        a.start_heartbeat(5)


def wait_for(condition, limit: float = 60.0) -> None:
    """Poll a condition; the limit only stops a broken test from hanging, it asserts nothing."""
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_renew_whose_answer_was_lost_is_still_ours(runstore):
    """A backend that applied the write but reported a conflict (its retry met our own write)
    must not make the agent give up a lease it holds."""
    a = agent(runstore, "a")
    a.acquire()
    real_write = runstore.store.write

    def write_then_lose_answer(key, data, *, expect=None):
        real_write(key, data, expect=expect)
        raise ConflictError(f"{key} changed since it was read")

    runstore.store.write = write_then_lose_answer
    renewed = a.renew()
    runstore.store.write = real_write
    assert runstore.read_lease()[0].renewed_at == renewed.renewed_at
    a.renew()  # the adopted version is the stored one: the next condition holds
    with pytest.raises(LeaseHeldError):
        agent(runstore, "b").acquire()
