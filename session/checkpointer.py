"""Checkpoints of a session: saved in the training thread, uploaded in a background thread.

Periodic checkpoints upload while training goes on; the last one before the deadline (or after
a signal) is synchronous, and when the store is down past the retries it goes to the local
spool, which the next session on this machine pushes first (handoff/spool.py).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from baton.handoff import FencedError, StoreError, StoreUnavailableError
from baton.handoff.checkpoint import checkpoint_id, commit_checkpoint
from baton.handoff.lease import LeaseLostError, LeaseManager
from baton.handoff.runstore import RunStore
from baton.handoff.spool import Spooled, spool
from baton.state_schema import RunSpec, SessionRecord

from .clock import SessionClock

log = logging.getLogger("baton.session")


class Checkpointer:
    """Saves locally in the training thread; uploads in one background thread, one at a time.

    Periodic checkpoints upload while training goes on; the last one is synchronous. A failed
    background upload is logged and the next checkpoint tries again, except a fence, which
    means another agent owns the run: it is raised into the training loop at once."""

    def __init__(self, runstore: RunStore, lease: LeaseManager, spec: RunSpec, workdir: Path,
                 record: SessionRecord, clock: SessionClock, every: float):
        self.runstore, self.lease, self.spec = runstore, lease, spec
        self.workdir, self.staging = workdir, workdir / "staging"
        self.record, self.clock, self.every = record, clock, every
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-upload")
        self.pending: Optional[Future] = None
        # The run's page (card.HubPage) on a store that shows one: its files ride in each
        # checkpoint's commit. None elsewhere.
        self.page = None
        self.last = time.monotonic()
        self.committed_step: Optional[int] = None
        # No measured commit yet: checkpoint right after the first step to learn its cost.
        self.measure_first = clock.slowest_commit == 0.0

    def due(self) -> bool:
        if self.pending is not None:
            return False
        return self.measure_first or time.monotonic() - self.last >= self.every

    def save(self, trainer) -> tuple[Path, int, float]:
        """A local save, in the training thread; returns (folder, step, seconds). No eval:
        evals run on their own schedule (session/evals.py), never to time a commit."""
        began = time.monotonic()
        step = trainer.cursor.step
        if trainer.cursor.base_eval_loss is not None:  # for status, beside HEAD's cursor
            self.record.base_eval_loss = trainer.cursor.base_eval_loss
        folder = self.staging / f"{step:08d}-{uuid.uuid4().hex[:6]}"
        shutil.rmtree(folder, ignore_errors=True)
        trainer.save(folder)
        seconds = time.monotonic() - began
        self.record.save_seconds.append(round(seconds, 3))
        return folder, step, seconds

    def _upload(self, folder: Path, step: int, finished: bool,
                cleanup: bool = True, last: bool = False) -> tuple[int, float]:
        """Commit a saved folder (then remove it); (step, seconds). `last`: the session's
        final commit, after which the run is paused (or finished)."""
        began = time.monotonic()
        try:
            self._commit_with_page(folder, step, finished, last)
        finally:
            if cleanup:
                shutil.rmtree(folder, ignore_errors=True)
        return step, time.monotonic() - began

    def _commit_with_page(self, folder: Path, step: int, finished: bool, last: bool) -> None:
        extra = self._page_files(folder, step, finished, last)
        commit = lambda files: commit_checkpoint(  # noqa: E731
            self.runstore, folder, step=step, generation=self.lease.generation,
            finished=finished, keep=self.spec.keep, extra=files)
        try:
            commit(extra)
        except ValueError as exc:  # the Hub refused the card's metadata: commit without it
            if not extra:
                raise
            log.warning("the store refused the run's page (%s); checkpoint %d is committed "
                        "without it", exc, step)
            commit({})

    def _page_files(self, folder: Path, step: int, finished: bool, last: bool) -> dict:
        """The page's files for this commit; a page that cannot be drawn costs the page,
        never the checkpoint."""
        if self.page is None:
            return {}
        try:
            return self.page.files(folder, checkpoint_id(step, self.lease.generation),
                                   finished, last)
        except Exception as exc:  # noqa: BLE001 - any fault of the page is only logged
            log.warning("the run's page was not updated with checkpoint %d (%s: %s)", step,
                        type(exc).__name__, exc)
            return {}

    def _upload_or_spool(self, folder: Path, step: int,
                         finished: bool) -> tuple[float, Optional[Spooled]]:
        """The final upload. With the store down past the retries, the checkpoint goes to the
        local spool. Returns (upload seconds, None) or (0, Spooled)."""
        try:
            return self._upload(folder, step, finished, cleanup=False, last=True)[1], None
        except StoreUnavailableError as exc:
            log.warning("final checkpoint of step %d did not reach the store: %s", step, exc)
            return 0.0, spool(folder, self.workdir, self.runstore.run, step,
                              self.lease.generation, store=self.runstore.store.uri)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def start(self, trainer) -> None:
        folder, step, save_s = self.save(trainer)
        self.pending = self.pool.submit(self._upload, folder, step, False)
        self.pending.save_seconds = save_s  # type: ignore[attr-defined]
        self.last, self.measure_first = time.monotonic(), False

    def poll(self, wait: bool = False) -> bool:
        """Collect a finished background upload; True when one was committed just now."""
        if self.pending is None or not (wait or self.pending.done()):
            return False
        future, self.pending = self.pending, None
        try:
            step, upload_s = future.result()
        except (FencedError, LeaseLostError):
            raise
        except (StoreError, OSError) as exc:  # an outage must not end the session; a bug does
            log.warning("background checkpoint failed (%s: %s); the next one retries",
                        type(exc).__name__, exc)
            return False
        self._committed(step, future.save_seconds, upload_s)  # type: ignore[attr-defined]
        return True

    def _committed(self, step: int, save_s: float, upload_s: float) -> None:
        self.committed_step = step
        self.record.upload_seconds.append(round(upload_s, 3))
        self.clock.observe_commit(save_s + upload_s)

    def commit_now(self, trainer, finished: bool) -> Optional[Spooled]:
        """The last checkpoint: synchronous, after any background upload has landed.
        Returns the Spooled checkpoint when the store could not take it, else None."""
        self.poll(wait=True)
        if trainer.cursor.step == 0 or (self.committed_step == trainer.cursor.step
                                        and not finished):
            return None  # nothing trained since the last commit (or at all)
        folder, step, save_s = self.save(trainer)
        upload_s, spooled = self._upload_or_spool(folder, step, finished)
        if spooled is None:
            self._committed(step, save_s, upload_s)
        return spooled

    def close(self) -> None:
        # Let an upload in flight land (or fail on the fence) before the lease is released, so
        # no commit of ours can race the next agent's start.
        self.pool.shutdown(wait=True, cancel_futures=True)
