#!/usr/bin/env python
"""Kill test: SIGKILL the agent again and again over one run, restart it, and count the damage.

The agent trains a tiny model against a local folder and against SeaweedFS (S3). Each trial
starts `agent.py run` and kills it with SIGKILL at a kill point (tests/faults.py: inside a
train step, between the files of a checkpoint upload, between the upload and the move of HEAD,
inside a lease renewal) or after a random delay; the next trial restarts it with --takeover
(the script knows the old process is dead, and its lease has not expired yet). At the end a
last session finishes the run, and its final adapter is compared with an uninterrupted run's
(bit-identical on CPU when the optimizer state is checkpointed).

    python tests/killtest.py [--local 12] [--s3 8] [--seed 0] [--json out.json]

Figures printed: trials, kills, resumes that succeeded, committed checkpoints lost (must be 0),
steps and seconds lost per kill against the checkpoint interval, and whether the final
adapter equals the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.agent_helpers import (  # noqa: E402 - after the path set-up above
    agent_command,
    agent_env,
    build_tiny_model,
    open_run,
    write_config,
    write_data,
)

KINDS = ("step", "upload", "before_head", "renew", "random")
EVERY_S = 1.0  # checkpoint.every: short, so that every kind of kill point comes up quickly
LEASE_TTL_S = 3.0  # renewals every second, so `renew` kills come up quickly too
TRIAL_TIMEOUT_S = 300.0
RUN = "t"
STARTED = re.compile(r"^run '[^']+': step (\d+)/(\d+)")
STEP = re.compile(r"^step (\d+)/(\d+)")


@dataclass
class Trial:
    kind: str
    killpoint: Optional[str]
    code: int = 0
    killed: bool = False
    hit_killpoint: bool = False
    resumed_from: Optional[int] = None
    last_step: Optional[int] = None
    head_after: Optional[int] = None  # HEAD's step once the process was gone
    fell_back: bool = False  # the session said HEAD's checkpoint failed verification
    lost_steps: Optional[int] = None  # filled in by the next trial
    lost_seconds: Optional[float] = None
    step_times: dict = field(default_factory=dict)  # step -> time its line was printed
    killed_at: Optional[float] = None
    tail: str = ""


@dataclass
class Report:
    store: str
    trials: list[Trial]
    finished: bool
    final_matches_baseline: Optional[bool] = None

    @property
    def kills(self) -> list[Trial]:
        return [t for t in self.trials if t.killed]

    def resumes(self) -> int:
        """Sessions after a kill that got as far as resuming (a kill can come before that)."""
        pairs = zip(self.trials, self.trials[1:])
        return sum(1 for a, b in pairs if a.killed and b.resumed_from is not None)

    def resumes_ok(self) -> int:
        """Of those, the ones that started from the HEAD the kill left, verified."""
        pairs = zip(self.trials, self.trials[1:])
        return sum(1 for a, b in pairs if a.killed and b.resumed_from is not None
                   and b.resumed_from == (a.head_after or 0) and not b.fell_back)

    def committed_lost(self) -> int:
        """Kills after which the next session started below the step HEAD had committed."""
        pairs = zip(self.trials, self.trials[1:])
        return sum(1 for a, b in pairs if a.killed and b.resumed_from is not None
                   and a.head_after is not None and b.resumed_from < a.head_after)

    def summary(self) -> dict:
        lost = [t.lost_steps for t in self.kills if t.lost_steps is not None]
        seconds = [t.lost_seconds for t in self.kills if t.lost_seconds is not None]
        return {
            "store": self.store, "trials": len(self.trials), "kills": len(self.kills),
            "kills_by_kind": {k: sum(1 for t in self.kills if t.kind == k) for k in KINDS},
            "resumes": self.resumes(), "resumes_ok": self.resumes_ok(),
            "committed_lost": self.committed_lost(),
            "steps_lost_max": max(lost, default=0),
            "steps_lost_mean": round(sum(lost) / len(lost), 2) if lost else 0.0,
            "seconds_lost_max": round(max(seconds, default=0.0), 2),
            "checkpoint_every_s": EVERY_S, "finished": self.finished,
            "final_matches_baseline": self.final_matches_baseline,
        }


# -- one agent process ---------------------------------------------------------------------

class Agent:
    """agent.py run in a subprocess; its output lines are collected with their times."""

    def __init__(self, config: Path, workdir: Path, *, killpoint: Optional[str],
                 takeover: bool):
        # agent_command runs tests/agent_entry.py: the kill sites wrapped, a short lease.
        command = agent_command(config, *(["--takeover"] if takeover else []), workdir=workdir)
        env = agent_env(lease_ttl=LEASE_TTL_S,
                        **({"BATON_KILLPOINT": killpoint} if killpoint else {}))
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self.training = threading.Event()
        self.done: "queue.Queue[bool]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def wait_steps(self, count: int, timeout: float) -> None:
        """Return once `count` more step lines have appeared, or the process ended."""
        seen = lambda: sum(1 for _, line in self.lines if STEP.search(line))  # noqa: E731
        target, end = seen() + count, time.time() + timeout
        while seen() < target and self.proc.poll() is None and time.time() < end:
            time.sleep(0.02)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))
            if STARTED.search(line):
                self.training.set()
        self.training.set()
        self.done.put(True)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.done.get(timeout=30)  # every line read
        return code


def run_trial(config: Path, workdir: Path, kind: str, rng: random.Random,
              takeover: bool) -> Trial:
    killpoint = _pick_killpoint(kind, rng)
    trial = Trial(kind=kind, killpoint=killpoint)
    agent = Agent(config, workdir, killpoint=killpoint, takeover=takeover)
    if kind == "random":
        # A random number of steps, then a random fraction of a step: counted in steps rather
        # than seconds so the kill lands mid-training however fast or loaded the machine is.
        agent.training.wait(TRIAL_TIMEOUT_S)
        agent.wait_steps(rng.randint(1, 3), TRIAL_TIMEOUT_S)
        time.sleep(rng.uniform(0.0, 0.05))
        if agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGKILL)
    trial.code = agent.wait(TRIAL_TIMEOUT_S)
    trial.killed = trial.code == -signal.SIGKILL
    trial.killed_at = time.time() if trial.killed else None
    _read_output(trial, agent.lines)
    return trial


def _pick_killpoint(kind: str, rng: random.Random) -> Optional[str]:
    counts = {"step": (2, 4), "upload": (1, 8), "before_head": (1, 3), "renew": (1, 3)}
    if kind == "random":
        return None
    low, high = counts[kind]
    return f"{kind}:{rng.randint(low, high)}"


def _read_output(trial: Trial, lines: list[tuple[float, str]]) -> None:
    from tests.faults import ANNOUNCE

    for when, line in lines:
        if match := STARTED.search(line):
            trial.resumed_from = int(match.group(1))
            trial.step_times[trial.resumed_from] = when
        elif match := STEP.search(line):
            trial.last_step = int(match.group(1))
            trial.step_times[trial.last_step] = when
        trial.hit_killpoint |= line.startswith(ANNOUNCE)
        trial.fell_back |= "failed verification" in line
    trial.tail = "\n".join(line for _, line in lines[-15:])


# -- one run, killed over and over ---------------------------------------------------------

def kill_run(config: Path, workdir: Path, uri: str, kills: int, rng: random.Random,
             log=print) -> Report:
    """Kill the agent `kills` times over one run, then let a last session finish it."""
    trials: list[Trial] = []
    kinds = [KINDS[i % len(KINDS)] for i in range(kills)]
    rng.shuffle(kinds)
    for kind in kinds + ["finish"]:
        if kind == "finish":
            trial = _finish(config, workdir, takeover=bool(trials))
        else:
            trial = run_trial(config, workdir, kind, rng, takeover=bool(trials))
        trial.head_after = _head_step(uri)
        _account(trials, trial)
        trials.append(trial)
        log(f"  {uri.split('/')[0] or 'local'} trial {len(trials):2d} {trial.kind:11s} "
            f"{trial.killpoint or '':14s} exit {trial.code:3d} resumed {trial.resumed_from} "
            f"last step {trial.last_step} HEAD {trial.head_after}")
        if trial.code not in (0, -signal.SIGKILL):
            raise RuntimeError(f"agent exited {trial.code} in trial {len(trials)}:\n{trial.tail}")
        if trial.code == 0:
            break
    return Report(store=uri, trials=trials, finished=trials[-1].code == 0)


def _finish(config: Path, workdir: Path, takeover: bool) -> Trial:
    trial = Trial(kind="finish", killpoint=None)
    agent = Agent(config, workdir, killpoint=None, takeover=takeover)
    trial.code = agent.wait(TRIAL_TIMEOUT_S)
    _read_output(trial, agent.lines)
    return trial


def _account(trials: list[Trial], current: Trial) -> None:
    """Steps and seconds the previous kill cost: done before it, redone after it."""
    if not trials or not trials[-1].killed or current.resumed_from is None:
        return
    killed = trials[-1]
    done = killed.last_step if killed.last_step is not None else current.resumed_from
    killed.lost_steps = max(0, done - current.resumed_from)
    reached = killed.step_times.get(current.resumed_from)
    if reached is not None and killed.killed_at is not None:
        killed.lost_seconds = killed.killed_at - reached


def _head_step(uri: str) -> Optional[int]:
    runstore = open_run(uri, RUN)
    try:
        got = runstore.read_head()
    finally:
        runstore.store.close()
    return got[0].step if got and got[0].checkpoint else None


# -- the final adapter ---------------------------------------------------------------------

def final_adapter(uri: str, dest: Path) -> dict:
    """The tensors of the adapter HEAD names, pulled and verified."""
    from safetensors.numpy import load_file

    from baton.handoff.checkpoint import pull_checkpoint

    runstore = open_run(uri, RUN)
    try:
        ref = pull_checkpoint(runstore, dest)
    finally:
        runstore.store.close()
    if ref is None:
        raise RuntimeError(f"run {RUN!r} in {uri} has no checkpoint")
    return load_file(str(ref.path / "adapter_model.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and (a[k] == b[k]).all()
        for k in a)


def make_config(folder: Path, model: Path, data: Path, uri: str, steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder, model_dir=model, train_file=data, store=uri, run=RUN,
                        train={"max_steps": steps},
                        checkpoint={"every": f"{EVERY_S}s", "keep": 3, "optimizer": True})


def baseline(folder: Path, model: Path, data: Path, steps: int) -> dict:
    """An uninterrupted run of the same spec: the adapter the killed runs must end with."""
    uri = str(folder / "store")
    config = make_config(folder, model, data, uri, steps)
    trial = _finish(config, folder / "work", takeover=False)
    if trial.code != 0:
        raise RuntimeError(f"the uninterrupted run failed ({trial.code}):\n{trial.tail}")
    return final_adapter(uri, folder / "final")


def check_run(folder: Path, model: Path, data: Path, uri: str, steps: int, kills: int,
              rng: random.Random, reference: dict, log=print) -> Report:
    config = make_config(folder, model, data, uri, steps)
    report = kill_run(config, folder / "work", uri, kills, rng, log=log)
    if report.finished:
        report.final_matches_baseline = same_tensors(final_adapter(uri, folder / "final"),
                                                     reference)
    return report


# -- command line --------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, default=12, help="kills on the local store")
    parser.add_argument("--s3", type=int, default=8, help="kills on SeaweedFS (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    steps = 3 * max(args.local, args.s3) + 6
    with tempfile.TemporaryDirectory(prefix="baton-killtest-") as tmp:
        folder = Path(tmp)
        model = build_tiny_model(folder / "tiny")
        data = write_data(folder / "train.jsonl", n=64)
        reference = baseline(folder / "baseline", model, data, steps)
        reports = [check_run(folder / "local", model, data, str(folder / "local" / "store"),
                             steps, args.local, rng, reference)]
        if args.s3:
            from tests.servers.seaweed import running_seaweed

            with running_seaweed(folder / "seaweed") as server:
                reports.append(check_run(folder / "s3", model, data, server.new_bucket_uri(),
                                         steps, args.s3, rng, reference))
    figures = [r.summary() for r in reports]
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "trials": [
            [asdict(t) for t in r.trials] for r in reports]}, indent=1, default=str))
    ok = all(f["committed_lost"] == 0 and f["finished"] and f["final_matches_baseline"]
             for f in figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
