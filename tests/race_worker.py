"""A separate agent process for tests/test_races.py: `python -m tests.race_worker MODE ...`.

Modes:
  acquire  wait at a file barrier, then try to take the lease; print the outcome.
  hold     take the lease, say so, wait for a go file, then try to commit and renew (fencing).
  cut      commit a checkpoint but SIGKILL itself on the N-th file upload (a VM that died).

Each prints one JSON line on stdout. Store credentials and endpoints come from the environment
the test's fixtures set (AWS_*, HF_*), as they would on a real machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import types
from pathlib import Path

BARRIER_SECONDS = 120.0


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + BARRIER_SECONDS
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared; the test driving this worker is gone")
        time.sleep(0.002)


def _runstore(args):
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore

    return RunStore(open_store(args.store), args.run)


def _manager(args, runstore):
    from baton.handoff.lease import LeaseManager

    return LeaseManager(runstore, holder=args.holder, host=f"worker-{args.holder}", ttl=args.ttl)


def run_acquire(args) -> int:
    from baton.handoff.lease import LeaseHeldError, LeaseLostError

    manager = _manager(args, _runstore(args))
    Path(args.barrier, f"ready-{args.holder}").touch()
    _wait_for(Path(args.barrier, "go"))
    try:
        lease = manager.acquire(takeover=args.takeover)
    except LeaseHeldError as exc:
        _say(holder=args.holder, result="held", by=exc.lease.holder)
        return 73
    except LeaseLostError:
        _say(holder=args.holder, result="lost")
        return 74
    _say(holder=args.holder, result="won", generation=lease.generation)
    return 0


def run_hold(args) -> int:
    from baton.handoff import FencedError
    from baton.handoff.checkpoint import commit_checkpoint
    from baton.handoff.lease import LeaseLostError

    runstore = _runstore(args)
    manager = _manager(args, runstore)
    lease = manager.acquire()
    _say(holder=args.holder, result="acquired", generation=lease.generation)
    _wait_for(Path(args.barrier, "go"))
    outcome = {"holder": args.holder}
    try:
        outcome["commit"] = commit_checkpoint(runstore, Path(args.src), step=args.step,
                                              generation=manager.generation)
    except FencedError:
        outcome["commit"] = "fenced"
    try:
        manager.renew()
        outcome["renew"] = "renewed"
    except LeaseLostError:
        outcome["renew"] = "lost"
    _say(**outcome)
    return 0


def run_cut(args) -> int:
    """Die by SIGKILL on the `kill_after`-th upload: no cleanup, no finally, like a lost VM.

    A backend whose `publish` is one atomic commit (the Hub) would leave nothing at all; this
    worker forces the generic files-then-HEAD path so that some files do land, which is the
    harder case for pull and retention."""
    from baton.handoff.checkpoint import commit_checkpoint
    from baton.handoff.store import Store

    runstore = _runstore(args)
    store = runstore.store
    real_upload, calls = store.upload, []

    def upload(key, path):
        calls.append(key)
        if len(calls) >= args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        real_upload(key, path)

    store.upload = upload
    store.publish = types.MethodType(Store.publish, store)
    commit_checkpoint(runstore, Path(args.src), step=args.step, generation=args.generation)
    _say(result="committed")  # reached only if the kill point was never hit
    return 0


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["acquire", "hold", "cut"])
    parser.add_argument("--store", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--holder", default="worker")
    parser.add_argument("--barrier", default=".")
    parser.add_argument("--ttl", type=float, default=600.0)
    parser.add_argument("--takeover", action="store_true")
    parser.add_argument("--src", default=".")
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--kill-after", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    return {"acquire": run_acquire, "hold": run_hold, "cut": run_cut}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
