"""More than one GPU: one rank a GPU, started by torch's elastic launcher (what torchrun runs).

Each rank re-runs the command the person typed (the same entry script, the same arguments) in
a process of its own with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); `agent.py run` sees RANK there and runs one rank of the session (loop.py,
ranks.py). What Baton adds to torch's launcher, and why:

- The session's exit code is rank 0's, a pause (75) included: `run_rank` returns it and
  `elastic_launch` hands back each rank's return value. (torchrun would turn 75 into a failure.)
- A rank that dies ends the session at once: torch's agent sees the dead process within
  MONITOR_S, SIGTERMs the others and SIGKILLs them 30 s later, instead of rank 0 waiting out a
  collective's 10-minute timeout. Rank 0, if alive, releases the lease itself; if it was killed
  holding it, the launcher releases it (the lease's holder id is the launcher's, given to rank 0
  in HOLDER_ENV), so the next session need not wait for the lease's TTL.
- SIGTERM and SIGINT go to rank 0 alone, which commits and exits 75. torch's own handling would
  signal every rank and then wait for finished ranks that never exit, so the launch runs in a
  thread (torch installs its handlers only from the main thread) and the main thread forwards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import runpy
import signal
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from .codes import FAILED

log = logging.getLogger("baton.session")

HOLDER_ENV = "BATON_LEASE_HOLDER"  # rank 0 takes the lease under the launcher's holder id
PID_FILE = "rank0.pid"  # where rank 0 says which process the launcher forwards signals to
MONITOR_S = 0.5  # how often torch's agent looks at the ranks
POLL_S = 0.2  # how often the launcher's main thread forwards a pending signal
FORWARDED = (signal.SIGTERM, signal.SIGINT)


# -- inside a rank ---------------------------------------------------------------------------

def run_rank(script: str, argv: list[str], holder: str, folder: str) -> int:
    """One rank: the launcher's own entry script and arguments, run as __main__ here (as
    `torchrun --run-path` does), so an entry point that installs hooks (the tests') installs
    them in every rank. Returns rank 0's exit code; a failure ends the process with it."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        os.environ[HOLDER_ENV] = holder
        _write_atomically(Path(folder) / PID_FILE, str(os.getpid()))
    else:  # rank 0 decides when to stop; a terminal's Ctrl-C reaches every rank of the group
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_IGN)
    code = run_script(script, argv)
    if code == FAILED or (rank and code):
        # The process fails, so the launcher stops the other ranks. A returned value would
        # wait for every rank to return (a dead one never does); the error is already told.
        raise SystemExit(code)
    return code


def run_script(script: str, argv: list[str]) -> int:
    """Run `script` as __main__ with `argv`; its exit code (sys.exit's argument)."""
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # sys.exit("message"), as the interpreter would
        return 1
    return 0


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


# -- the launcher ----------------------------------------------------------------------------

def launch(world: int, script: str, argv: list[str], *, store: str, run: str) -> int:
    """Start `world` ranks of `script argv`; rank 0's exit code, or FAILED if a rank died."""
    holder = uuid.uuid4().hex[:16]
    with tempfile.TemporaryDirectory(prefix="baton-ranks-") as tmp:
        folder = Path(tmp)
        job = _Launch(_launcher(world, folder, holder), (script, list(argv), holder, tmp))
        with _held_signals() as pending:
            job.start()
            while job.is_alive():
                job.join(POLL_S)
                _forward(pending, folder / PID_FILE)
        code = job.exit_code()
    if code == FAILED:
        release_abandoned_lease(store, run, holder)
    return code


class _OwnSignals(logging.Filter):
    """torch warns that, launched from a thread, it cannot forward signals: we forward them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "signal handlers" not in record.getMessage()


def _launcher(world: int, folder: Path, run_id: str):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_OwnSignals())

    # torchrun --standalone on one machine; no restarts: a dead rank ends the session.
    wanted = dict(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=run_id,
                  rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
                  max_restarts=0, monitor_interval=MONITOR_S, start_method="spawn",
                  logs_specs=DefaultLogsSpecs(log_dir=str(folder / "logs")))
    known = {field.name for field in dataclasses.fields(LaunchConfig)}  # older torch has fewer
    config = LaunchConfig(**{k: v for k, v in wanted.items() if k in known})
    return elastic_launch(config, run_rank)


class _Launch(threading.Thread):
    """elastic_launch in a thread of its own; its return values or its exception kept."""

    def __init__(self, launcher, args: tuple):
        super().__init__(name="baton-launch", daemon=True)
        self.launcher, self.args = launcher, args
        self.values: Optional[dict[int, Any]] = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.values = self.launcher(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            self.error = exc

    def exit_code(self) -> int:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        if isinstance(self.error, ChildFailedError):
            return _rank_died(self.error)
        if self.error is not None:
            raise self.error
        return int(self.values[0])


def _rank_died(error) -> int:
    rank, failure = error.get_first_failure()
    if rank == 0 and failure.exitcode == FAILED:
        return FAILED  # rank 0 ended the session with 1 and has said why
    how = (f"killed by {failure.signal_name()}" if failure.exitcode < 0
           else f"exit code {failure.exitcode}")
    log.error("rank %s of the session ended (%s); every rank is needed for each step, so the "
              "session stopped. The last committed checkpoint is intact; run again.", rank, how)
    return FAILED


@contextmanager
def _held_signals():
    """SIGTERM and SIGINT are queued for rank 0 instead of ending the launcher."""
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum))
           for s in FORWARDED}
    try:
        yield pending
    finally:
        for signum, previous in old.items():
            signal.signal(signum, previous)


def _forward(pending: list[int], pid_file: Path) -> None:
    """Hand queued signals to rank 0 once it has said which process it is."""
    if not pending or not pid_file.is_file():
        return
    pid = int(pid_file.read_text())
    while pending:
        try:
            os.kill(pid, pending.pop(0))
        except ProcessLookupError:  # rank 0 already ended; the launch ends with it
            pending.clear()


# -- after a rank died -----------------------------------------------------------------------

def release_abandoned_lease(store_uri: str, run: str, holder: str) -> bool:
    """Release the run's lease if rank 0 was killed while holding it (`holder` is ours, the
    write is conditional on its version): the next session need not wait for its TTL."""
    from baton.handoff import ConflictError, StoreError, open_store
    from baton.handoff.retry import RetryPolicy
    from baton.handoff.runstore import RunStore
    from baton.state_schema.records import utcnow

    store = None
    try:
        store = open_store(store_uri, retry=RetryPolicy(attempts=3, max_seconds=15))
        runstore = RunStore(store, run)
        current = runstore.read_lease()
        if current is None or current[0].holder != holder or current[0].released:
            return False
        released = current[0].model_copy(update={"released": True, "renewed_at": utcnow()})
        runstore.write_lease(released, expect=current[1])
        log.warning("released the lease rank 0 held when it ended")
        return True
    except (ConflictError, StoreError) as exc:  # taken over meanwhile, or the store is down
        log.warning("lease not released (%s); it expires at its TTL", exc)
        return False
    finally:
        if store is not None:
            store.close()
