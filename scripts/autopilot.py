#!/usr/bin/env python
"""Start Kaggle sessions of a run, one after another, until it is finished.

    python scripts/autopilot.py --kaggle OWNER/KERNEL --store URI --run NAME
                                [--every 10m] [--max-sessions N] [--reserve 2h]
                                [--accelerator NvidiaTeslaT4|NvidiaL4]
                                [--repo GIT_URL] [--config run.yaml]

Run it on any always-on machine (or a scheduled job). Each look it reads the run's state as
`agent.py status` does; when the run is paused, no lease is live and the weekly GPU quota left
(less `--reserve`) covers a model load plus one checkpoint interval (kaggle_quota.py), it
pushes a new version of the Kaggle notebook in scripts/kaggle/ (on `--accelerator`: by default
`NvidiaTeslaT4`, which since September 2026 is Kaggle's free "GPU T4 x2" (kaggle-cli #1198; a
single T4 is no longer offered), where the agent trains on both GPUs, data-parallel or with the
4-bit base sharded (train.sharding); internet on, private), which runs one session of `agent.py run`, and then polls it. While the quota is
short it says when the quota refreshes. It stops when the run is finished (0), after two
sessions in a row failed (1), or after --max-sessions (0). It never pushes while a lease is live
or a version is running: there are never two sessions on one run. One line per decision.

Credentials: the official `kaggle` client's (KAGGLE_USERNAME and KAGGLE_KEY, KAGGLE_API_TOKEN,
or ~/.kaggle/kaggle.json); the store's own (HF_TOKEN, AWS_*) to read the run's state.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from baton.handoff import StoreConfigError, StoreError, open_store  # noqa: E402
from baton.handoff.runstore import RunStore  # noqa: E402
from baton.handoff.secrets import scrub  # noqa: E402
from baton.session.codes import FAILED, INVALID, OK  # noqa: E402
from baton.session.status import RunNotFoundError, collect_status  # noqa: E402
from baton.state_schema import parse_duration  # noqa: E402

from baton.scripts.kaggle_quota import (DEFAULT_MODEL_LOAD_S, checkpoint_every_s,  # noqa: E402
                                  model_load_s, read_quota, verdict)

TEMPLATE = ROOT / "scripts" / "kaggle"
LIVE = {"QUEUED", "RUNNING", "NEW_SCRIPT", "CANCEL_REQUESTED"}  # a version still holds a GPU
FAILED_STATES = {"ERROR", "CANCEL_ACKNOWLEDGED"}
FAILURES_TO_STOP = 2
# kernel-metadata.json's machine_shape: the GPU names of kaggle-cli's docs/kernels.md
# (`kaggle kernels push --accelerator`); the free tier has the first two. NvidiaTeslaT4 is two
# T4s since September 2026 (kaggle-cli #1198); NvidiaTeslaT4Highmem is an internal pool, not
# offered to users, and is refused here.
ACCELERATORS = {"NvidiaTeslaT4": "GPU T4 x2",
                "NvidiaL4": "GPU L4", "NvidiaL4X1": "GPU L4 x1",
                "NvidiaTeslaA100": "GPU A100", "NvidiaH100": "GPU H100",
                "NvidiaRtxPro6000": "GPU RTX Pro 6000"}


class KaggleError(Exception):
    """The Kaggle API refused or failed a call; the message says what to fix."""


def say(message: str) -> None:
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print(
        f"{time.strftime('%H:%M:%S')} {scrub(message)}", markup=False)


# -- Kaggle, through the official client ----------------------------------------------------

def kaggle_api():
    """An authenticated client; KaggleError when no credentials are found."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit:  # the client exits when it finds no credentials
        raise KaggleError("no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY (or "
                          "KAGGLE_API_TOKEN), or save ~/.kaggle/kaggle.json from "
                          "https://www.kaggle.com/settings/api") from None
    return api


def version_state(api, kernel: str) -> Optional[str]:
    """The state of the kernel's latest version ('RUNNING', 'COMPLETE', 'ERROR'...), or None
    when the kernel has no version yet."""
    from requests.exceptions import HTTPError

    try:
        return api.kernels_status(kernel).status.name
    except HTTPError as exc:
        if getattr(exc.response, "status_code", None) == 404:
            return None
        raise KaggleError(f"Kaggle status of {kernel} failed: {exc}") from None
    except ValueError as exc:  # the client's words for 401/403
        raise KaggleError(str(exc)) from None


def render_notebook(folder: Path, args: argparse.Namespace) -> Path:
    """The template of scripts/kaggle/ filled in for this run, in `folder`."""
    meta = json.loads((TEMPLATE / "kernel-metadata.json").read_text())
    meta["id"], meta["title"] = args.kaggle, args.kaggle.split("/", 1)[1]
    meta["machine_shape"], meta["enable_gpu"] = args.accelerator, True
    (folder / "kernel-metadata.json").write_text(json.dumps(meta, indent=2))
    text = (TEMPLATE / meta["code_file"]).read_text()
    for name, value in (("REPO", args.repo), ("CONFIG", args.config), ("STORE", args.store),
                        ("RUN", args.run)):
        # inside a JSON string inside Python source: escape for both
        text = text.replace(f'\\"{{{{{name}}}}}\\"', json.dumps(json.dumps(value))[1:-1])
    (folder / meta["code_file"]).write_text(text)
    return folder


def push(api, args: argparse.Namespace) -> tuple[bool, str]:
    """Push a new version; (True, 'version N') or (False, why it was refused)."""
    from requests.exceptions import RequestException

    with tempfile.TemporaryDirectory(prefix="baton-kaggle-") as tmp:
        try:
            result = api.kernels_push(str(render_notebook(Path(tmp), args)))
        except RequestException as exc:
            return False, str(exc)
    if result.error:
        return False, result.error
    return True, f"version {result.version_number} ({result.url})"


# -- the decisions --------------------------------------------------------------------------

@dataclass
class Pilot:
    """What the autopilot remembers between looks."""

    sessions: int = 0  # versions pushed by this autopilot
    failures: int = 0  # sessions in a row that failed
    pushed_at_step: Optional[int] = None  # the run's step when the version in flight was pushed


def run_state(store, run: str) -> dict:
    try:
        return collect_status(store, run)
    except RunNotFoundError:  # the first session creates the run
        return {"state": "new", "step": 0, "total_steps": None, "lease": None}


def judge(pilot: Pilot, state: str, status: dict) -> None:
    """A version in flight has ended: count it as done or failed (an error, or no step
    gained: a session that trained nothing did not help the run)."""
    gained = status["step"] - pilot.pushed_at_step
    failed = state in FAILED_STATES or (gained <= 0 and status["state"] != "finished")
    pilot.failures = pilot.failures + 1 if failed else 0
    say(f"session {pilot.sessions} ended: Kaggle says {state}, step {pilot.pushed_at_step} -> "
        f"{status['step']}" + (f" (failed, {pilot.failures} in a row)" if failed else ""))
    pilot.pushed_at_step = None


def look(api, store, args: argparse.Namespace, pilot: Pilot) -> Optional[int]:
    """One look at the run and the notebook: an exit code to stop with, or None to go on."""
    # The notebook's state first: once it reads ended, everything it committed is in the
    # store, so the run's state read next is what the session left.
    state = version_state(api, args.kaggle)
    status = run_state(store, args.run)
    if state in LIVE:
        say(f"waiting: Kaggle version is {state}; run at step {status['step']}")
        return None
    if pilot.pushed_at_step is not None:
        judge(pilot, state or "gone", status)
    if status["state"] == "finished":
        say(f"run {args.run} is finished at step {status['step']}; stopping")
        return OK
    if pilot.failures >= FAILURES_TO_STOP:
        say(f"stopping: {pilot.failures} sessions in a row failed; look at the notebook's log "
            f"on Kaggle and at `agent.py status`")
        return FAILED
    if args.max_sessions is not None and pilot.sessions >= args.max_sessions:
        say(f"stopping: --max-sessions {args.max_sessions} reached; run at step "
            f"{status['step']}")
        return OK
    lease = status.get("lease")
    if lease and lease["live"]:
        say(f"waiting: the lease is live ({lease['host']}, until {lease['expires_at']}); "
            "not pushing")
        return None
    if not quota_allows(api, store, args):
        return None
    return start_session(api, args, pilot, status)


def quota_allows(api, store, args: argparse.Namespace) -> bool:
    """Whether the weekly GPU quota left covers a session's model load and first checkpoint
    (kaggle_quota.py); says so either way. A quota Kaggle does not report is not guessed."""
    from requests.exceptions import RequestException

    try:
        quota = read_quota(api)
    except (RequestException, ValueError) as exc:  # ValueError: the client's 401/403
        say(f"GPU quota unreadable ({exc}); pushing without checking it")
        return True
    if quota is None:
        say("Kaggle reports no GPU quota for this account; pushing without checking it")
        return True
    measured = model_load_s(RunStore(store, args.run).read_sessions())
    load = measured or DEFAULT_MODEL_LOAD_S
    why = (f"model load {load / 60:.0f} min {'measured' if measured else 'assumed'} + "
           f"{args.checkpoint_why}")
    ok, line = verdict(quota, load + args.checkpoint_every_s, args.reserve_s, why)
    say(line)
    return ok


def start_session(api, args: argparse.Namespace, pilot: Pilot, status: dict) -> None:
    ok, what = push(api, args)
    if not ok:
        say(f"push refused: {what}; looking again in {args.every_s:g}s")
        return None
    pilot.sessions += 1
    pilot.pushed_at_step = status["step"]
    say(f"pushed {what}: session {pilot.sessions} of run {args.run} ({status['state']} at "
        f"step {status['step']}) on {ACCELERATORS[args.accelerator]} ({args.accelerator})")
    return None


def pilot_loop(args: argparse.Namespace) -> int:
    api = kaggle_api()
    store = open_store(args.store)
    pilot = Pilot()
    try:
        while True:
            try:
                code = look(api, store, args, pilot)
            except StoreError as exc:  # an outage is waited out; the next look tries again
                if isinstance(exc, StoreConfigError):
                    raise
                say(f"store unreachable ({exc}); looking again in {args.every_s:g}s")
                code = None
            if code is not None:
                return code
            time.sleep(args.every_s)
    finally:
        store.close()


# -- command line ---------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="autopilot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kaggle", required=True, metavar="OWNER/KERNEL",
                        help="the Kaggle notebook to push versions of (created on first push)")
    parser.add_argument("--store", required=True, help="the run's store URI")
    parser.add_argument("--run", required=True, help="the run's name")
    parser.add_argument("--every", default="10m", help="time between looks (default 10m)")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="push at most N sessions, then stop")
    parser.add_argument("--repo", default="https://github.com/<you>/baton.git",
                        help="git URL the notebook clones Baton (and run.yaml) from")
    parser.add_argument("--config", default="run.yaml", help="run.yaml's path in that repo "
                        "(read here too, when it exists, for checkpoint.every)")
    parser.add_argument("--accelerator", default="NvidiaTeslaT4", choices=list(ACCELERATORS),
                        metavar="NAME", help="the notebook's machine_shape: NvidiaTeslaT4 (two "
                        "T4s, the free default), NvidiaL4, or another name of `kaggle kernels "
                        "push --accelerator`")
    parser.add_argument("--reserve", default="0", help="GPU quota to hold back for other use, "
                        "e.g. 2h (default none)")
    args = parser.parse_args(argv)
    owner, _, slug = args.kaggle.partition("/")
    if not owner or not slug or "/" in slug:
        parser.error(f"--kaggle {args.kaggle!r}: write OWNER/KERNEL, e.g. me/baton-run")
    try:
        args.every_s = parse_duration(args.every)
    except ValueError as exc:
        parser.error(f"--every: {exc}")
    if args.max_sessions is not None and args.max_sessions < 1:
        parser.error("--max-sessions must be at least 1")
    try:
        args.reserve_s = parse_duration(args.reserve)
    except ValueError as exc:
        parser.error(f"--reserve: {exc}")
    args.checkpoint_every_s, args.checkpoint_why = checkpoint_every_s(args.config)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return pilot_loop(args)
    except (KaggleError, StoreConfigError) as exc:
        print(scrub(f"autopilot: {exc}"), file=sys.stderr)
        return INVALID
    except KeyboardInterrupt:
        say("interrupted; a version already pushed keeps running on Kaggle")
        return OK


if __name__ == "__main__":
    sys.exit(main())
