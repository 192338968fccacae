"""The run's lease: one writer at a time, with a generation that fences out stale writers.

An agent takes `lease.json` when it is absent, released or expired, by a conditional write
that raises the generation; then it writes that generation into HEAD, so that from this moment
an older holder can no longer move HEAD (checkpoint.py refuses a generation below HEAD's). The
holder renews by heartbeat; a renewal is a conditional write on the version it last wrote, so
it fails the moment anyone else has written the lease.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from datetime import datetime, timedelta
from typing import Callable, Optional

from baton.state_schema import Head, Lease, utcnow

from .errors import ConflictError, StoreError
from .runstore import RunStore
from .store import ABSENT

log = logging.getLogger("baton.lease")

Clock = Callable[[], datetime]
ACQUIRE_ATTEMPTS = 5  # re-reads after a lost write; bounds a takeover racing a busy heartbeat


class LeaseHeldError(StoreError):
    """Another live agent holds the run's lease: this agent must change nothing (exit 73)."""

    def __init__(self, lease: Lease, run: str):
        self.lease = lease
        super().__init__(
            f"run {run!r} is held by agent {lease.holder} on {lease.host} ({lease.gpu}), "
            f"generation {lease.generation}, until {lease.expires_at.isoformat()}; wait for that "
            "session to end, or if you know it is dead, run again with --takeover"
        )


class LeaseLostError(StoreError):
    """Our lease was taken over (or expired and taken): a successor owns the run now."""


class LeaseManager:
    """Acquire, renew (by heartbeat) and release the lease of one run, for one agent."""

    def __init__(self, runstore: RunStore, *, holder: Optional[str] = None,
                 host: Optional[str] = None, gpu: str = "cpu", ttl: Optional[float] = None,
                 clock: Clock = utcnow):
        ttl = runstore.store.lease_ttl if ttl is None else ttl  # the store knows its budget
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive seconds, got {ttl}")
        self.runstore = runstore
        self.holder = holder or uuid.uuid4().hex[:16]
        self.host = host or socket.gethostname()
        self.gpu = gpu
        self.ttl = ttl
        self.clock = clock
        self.generation = 0
        self.lease: Optional[Lease] = None
        self.lost: Optional[LeaseLostError] = None  # set by the heartbeat thread
        self.failure: Optional[Exception] = None  # a bug in the heartbeat thread, re-raised
        self.renewals = 0
        self._version: Optional[str] = None
        self._lock = threading.Lock()  # heartbeat and main thread share _version
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    # -- acquire -------------------------------------------------------------------------

    def acquire(self, *, takeover: bool = False) -> Lease:
        """Take the lease and stamp its new generation into HEAD.

        LeaseHeldError when a live agent holds it (and no takeover): nothing is written."""
        with self._lock:
            for _ in range(ACQUIRE_ATTEMPTS):
                current = self.runstore.read_lease()
                self._refuse_if_held(current, takeover)
                if self._write_new_lease(current):
                    break
                # Someone wrote the lease after our read: a racing agent (then the re-read
                # refuses us), a release, or the live holder's heartbeat (a takeover retries).
            else:
                raise self._held_after_race()
        if current and current[0].live(self.clock()) and current[0].holder != self.holder:
            log.warning("took over the live lease of %s on %s (generation %d -> %d)",
                        current[0].holder, current[0].host, current[0].generation,
                        self.generation)
        self._stamp_head()
        return self.lease

    def _write_new_lease(self, current: Optional[tuple[Lease, str]]) -> bool:
        """Write the lease with the next generation; False if the condition failed."""
        head = self.runstore.read_head()
        generation = 1 + max(current[0].generation if current else 0,
                             head[0].generation if head else 0)
        lease = self._new_lease(generation)
        try:
            version = self.runstore.write_lease(lease, expect=current[1] if current else ABSENT)
        except ConflictError:
            version = self._stored_version_of(lease)
            if version is None:
                return False
        self.lease, self._version, self.generation, self.lost = lease, version, generation, None
        return True

    def _stored_version_of(self, written: Lease) -> Optional[str]:
        """The version of `written` if it is what the store holds: a conditional write whose
        answer was lost, retried by the client and refused, had in fact landed."""
        current = self.runstore.read_lease()
        if current is None:
            return None
        fields = ("holder", "generation", "acquired_at", "renewed_at", "expires_at", "released")
        same = all(getattr(current[0], f) == getattr(written, f) for f in fields)
        return current[1] if same else None

    def _refuse_if_held(self, current: Optional[tuple[Lease, str]], takeover: bool) -> None:
        if current is None or takeover:
            return
        lease = current[0]
        if lease.live(self.clock()) and lease.holder != self.holder:
            raise LeaseHeldError(lease, self.runstore.run)

    def _held_after_race(self) -> StoreError:
        """The lease kept changing under every attempt: report who holds it now."""
        current = self.runstore.read_lease()
        if current is None:
            return LeaseLostError(f"lease of run {self.runstore.run!r} changed while we took it; "
                                  "run again")
        return LeaseHeldError(current[0], self.runstore.run)

    def _new_lease(self, generation: int) -> Lease:
        now = self.clock()
        return Lease(holder=self.holder, host=self.host, gpu=self.gpu, generation=generation,
                     acquired_at=now, renewed_at=now,
                     expires_at=now + timedelta(seconds=self.ttl))

    def _stamp_head(self) -> None:
        """Write our generation into HEAD (creating it if absent), keeping its checkpoint.

        Retries while others move HEAD, gives up (LeaseLostError) once HEAD carries a higher
        generation: a successor took the lease after us."""
        while True:
            got = self.runstore.read_head()
            head, version = got if got else (Head(), ABSENT)
            if head.generation > self.generation:
                raise LeaseLostError(
                    f"run {self.runstore.run!r}: generation {head.generation} took the lease "
                    f"right after ours ({self.generation}); this agent must stop")
            if head.generation == self.generation:
                return
            stamped = head.model_copy(update={"generation": self.generation,
                                              "updated_at": self.clock()})
            try:
                self.runstore.write_head(stamped, expect=version)
                return
            except ConflictError:
                continue

    # -- renew and release ---------------------------------------------------------------

    def renew(self) -> Lease:
        """Extend our lease by `ttl`; LeaseLostError if anyone else wrote it since."""
        with self._lock:
            if self.lease is None or self._version is None:
                raise LeaseLostError("renew() before acquire(): this agent holds no lease")
            now = self.clock()
            renewed = self.lease.model_copy(update={
                "renewed_at": now, "expires_at": now + timedelta(seconds=self.ttl)})
            try:
                self._version = self.runstore.write_lease(renewed, expect=self._version)
            except ConflictError:
                version = self._stored_version_of(renewed)
                if version is None:
                    raise self._lost() from None
                self._version = version
            self.lease = renewed
            self.renewals += 1
            return renewed

    def _lost(self) -> LeaseLostError:
        current = self.runstore.read_lease()
        who = (f"agent {current[0].holder} on {current[0].host} (generation "
               f"{current[0].generation})" if current else "nobody (the lease was deleted)")
        return LeaseLostError(
            f"lost the lease of run {self.runstore.run!r} (generation {self.generation}): it is "
            f"now held by {who}; this agent must stop without committing")

    def release(self) -> None:
        """Mark the lease released so the next agent takes it at once; no-op if lost."""
        self.stop_heartbeat()
        with self._lock:
            if self.lease is None or self._version is None:
                return
            released = self.lease.model_copy(update={"released": True,
                                                     "renewed_at": self.clock()})
            try:
                self.runstore.write_lease(released, expect=self._version)
            except ConflictError:
                if self._stored_version_of(released) is None:
                        log.warning("lease of run %r was already taken by another agent; "
                                "nothing to release", self.runstore.run)
            self.lease, self._version = None, None

    def check(self) -> None:
        """Raise the loss (or the bug) the heartbeat recorded, so the training loop stops."""
        if self.lost is not None:
            raise self.lost
        if self.failure is not None:
            raise self.failure

    # -- heartbeat -----------------------------------------------------------------------

    def start_heartbeat(self, interval: float) -> None:
        """Renew every `interval` seconds in a daemon thread until stopped or lost."""
        if interval <= 0 or interval >= self.ttl:
            raise ValueError(f"heartbeat interval {interval}s must be in (0, ttl={self.ttl}s)")
        self.stop_heartbeat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval, self._stop),
                                        name=f"lease-heartbeat-{self.runstore.run}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._thread, self._stop = None, None

    def _beat(self, interval: float, stop: threading.Event) -> None:
        try:
            self._beat_until_stopped(interval, stop)
        except Exception as exc:
            # A bug, not an outage: hand it to the training thread (check() raises it there),
            # so the session ends with its traceback instead of training on an expiring lease.
            self.failure = exc
            raise

    def _beat_until_stopped(self, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            try:
                self.renew()
            except LeaseLostError as exc:
                self.lost = exc
                log.error("%s", exc)
                return
            except (StoreError, OSError) as exc:
                # A transient outage: the lease may still be ours; the next beat tries again,
                # and a successor can only take it once it has expired.
                log.warning("lease heartbeat failed (%s: %s); retrying in %.0fs",
                            type(exc).__name__, exc, interval)
