"""One session of a run: spec, lease, pull, train until the clock says stop, commit, release.

The order is what keeps the run safe: everything that can be refused (the config against the
stored spec, the data, the lease) is checked before anything is written; the lease's generation
fences every HEAD move, so a session that lost its lease stops without writing; the last
checkpoint is committed synchronously before the deadline or after a signal, and only then is
the lease released. Heavy modules (torch, the engine) are imported inside functions so that
`agent.py` can import this module right after validating the config.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional

from handoff import (
    ConflictError,
    CorruptCheckpointError,
    FencedError,
    StoreConfigError,
    StoreUnavailableError,
    open_store,
)
from handoff.checkpoint import commit_checkpoint, pull_checkpoint
from handoff.lease import LeaseHeldError, LeaseLostError, LeaseManager
from handoff.runstore import RunStore
from state_schema import RunConfig, RunSpec, SchemaError, SessionRecord, parse_duration

from .clock import SessionClock, describe, parse_start, resolve_window, utc_iso
from .data import DataError  # stdlib only: light enough for the CLI's first second

log = logging.getLogger("baton.session")

FINISHED, FAILED, INVALID, HELD, PAUSED = 0, 1, 2, 73, 75  # as agent.py documents them
HUB_LEASE_TTL = 1800.0  # the Hub takes ~128 commits an hour a repo: beat every 10 minutes
LEASE_TTL = 600.0


@dataclass
class SessionOptions:
    takeover: bool = False
    workdir: Optional[Path] = None
    log_every: Optional[float] = None  # seconds between progress lines off a terminal
    lease_ttl: Optional[float] = None
    scrub: Callable[[str], str] = field(default=lambda text: text)


def run_session(config: RunConfig, options: SessionOptions) -> int:
    """Run one session of `config.run`; return the exit code DESIGN.md defines. Under a
    multi-GPU launch (agent.py sets RANK), rank 0 runs the session and the others follow."""
    ranks = Ranks()
    ranks.start()
    code = FAILED
    try:
        code = _lead(config, options, ranks) if ranks.leader else follow(config, ranks)
    finally:
        ranks.close(code)
    return code


def _lead(config: RunConfig, options: SessionOptions, ranks: "Ranks") -> int:
    agent_start = time.time()
    say = Say(options.scrub)
    try:
        store = open_store(config.store)
    except StoreConfigError as exc:
        return say.error(str(exc), INVALID)
    try:
        return _run_in(RunStore(store, config.run), config, options, agent_start, say, ranks)
    except (SpecError, StoreConfigError, SchemaError) as exc:
        return say.error(str(exc), INVALID)
    except StoreUnavailableError as exc:
        return say.error(f"{exc}\nNothing was trained; run again when the store answers.",
                         FAILED)
    finally:
        store.close()


def _run_in(runstore: RunStore, config: RunConfig, options: SessionOptions,
            agent_start: float, say: "Say", ranks: "Ranks") -> int:
    spec = prepare_spec(runstore, config)
    head = runstore.read_head()
    if head and head[0].finished:
        say(f"run {config.run!r} is finished (step {head[0].step}, checkpoint "
            f"{head[0].checkpoint}); merge it with scripts/merge.py")
        return FINISHED
    clock = build_clock(config, runstore, agent_start, say)
    return Session(config, options, runstore, spec, clock, say, ranks).run(agent_start)


def build_clock(config: RunConfig, runstore: RunStore, agent_start: float, say) -> SessionClock:
    window = resolve_window(parse_start(config.session.start, now=agent_start),
                            parse_duration(config.session.limit), agent_start=agent_start)
    clock = SessionClock(window.start, window.limit).seed_from_records(runstore.read_sessions())
    if window.limit is None:
        say(f"session started {utc_iso(window.start)} ({window.start_source}); no time limit")
    else:
        say(f"session started {utc_iso(window.start)} ({window.start_source}), limit "
            f"{describe(window.limit)} ({window.limit_source}); stopping with a margin of "
            f"{describe(clock.margin())} that grows with measured steps and commits")
    return clock


# -- the spec: created once, matched by every later session ------------------------------

class SpecError(ValueError):
    """The config does not match the stored run, or its data or model cannot be used."""


def prepare_spec(runstore: RunStore, config: RunConfig) -> RunSpec:
    """The run's spec: the stored one after checking the config against it, or a new one
    (data uploaded first, then the spec created if still absent)."""
    stored = runstore.read_spec()
    if stored is None:
        spec = new_spec(runstore, config)
        try:
            runstore.create_spec(spec)
            return spec
        except ConflictError:  # another agent created the run at the same moment
            stored = runstore.read_spec()
    differences = spec_differences(stored, config)
    if differences:
        raise SpecError(
            f"the config does not match run {config.run!r} in {config.store}:\n  "
            + "\n  ".join(differences)
            + "\nPut the run's values back in the config, or pick a new run name to start "
            "a new run with these.")
    return stored


def new_spec(runstore: RunStore, config: RunConfig) -> RunSpec:
    from .data import check_format, detect_format, fingerprint, read_records

    data = config.data
    train = Path(data.train)
    try:
        sha = fingerprint(train)
        fmt = detect_format(train) if data.format == "auto" else data.format
        check_format(read_records(train), fmt, source=train)
        eval_sha = fingerprint(Path(data.eval)) if isinstance(data.eval, str) else None
    except DataError as exc:
        raise SpecError(str(exc)) from None
    revision = pinned_revision(config)
    key = runstore.upload_data(train, sha, train.suffix.lstrip(".") or "jsonl")
    eval_key = None
    if eval_sha is not None:
        eval_key = runstore.upload_data(Path(data.eval), eval_sha,
                                        Path(data.eval).suffix.lstrip(".") or "jsonl")
    t = config.train
    return RunSpec(
        run=config.run, model=config.model.model_copy(update={"revision": revision}),
        lora=config.lora, keep=config.checkpoint.keep, optimizer_state=config.checkpoint.optimizer,
        data={"source": data.train, "key": key, "sha256": sha, "format": fmt, "eval": data.eval,
              "eval_key": eval_key, "eval_sha256": eval_sha, "max_seq_len": data.max_seq_len,
              "packing": data.packing},
        train=t.model_dump(exclude={"micro_batch_size"}))


def pinned_revision(config: RunConfig) -> str:
    """The model revision as a commit (or a local folder's fingerprint), so that every session
    trains the same weights even when the branch moves."""
    from .model import resolve_revision

    try:
        return resolve_revision(config.model.name, config.model.revision)
    except Exception as exc:  # noqa: BLE001 - Hub and filesystem errors alike mean "fix model:"
        raise SpecError(f"model {config.model.name!r} at revision {config.model.revision!r} "
                        f"cannot be resolved ({type(exc).__name__}: {exc}); check model.name "
                        "and model.revision, and HF_TOKEN for a gated model") from None


def spec_differences(spec: RunSpec, config: RunConfig) -> list[str]:
    """Each field the config sets differently from the run, as 'key: run has X, config Y'."""
    pairs = [("model.load_in_4bit", spec.model.load_in_4bit, config.model.load_in_4bit),
             ("data.max_seq_len", spec.data.max_seq_len, config.data.max_seq_len),
             ("data.packing", spec.data.packing, config.data.packing),
             ("checkpoint.keep", spec.keep, config.checkpoint.keep),
             ("checkpoint.optimizer", spec.optimizer_state, config.checkpoint.optimizer)]
    pairs += [(f"lora.{k}", v, getattr(config.lora, k)) for k, v in spec.lora]
    pairs += [(f"train.{k}", v, getattr(config.train, k)) for k, v in spec.train]
    if config.data.format != "auto":
        pairs.append(("data.format", spec.data.format, config.data.format))
    if not same_model(spec, config):
        pairs.append(("model.name", spec.model.name, config.model.name))
    differences = [f"{key}: the run has {run!r}, the config says {cfg!r}"
                   for key, run, cfg in pairs if run != cfg]
    return differences + data_differences(spec, config)


def same_model(spec: RunSpec, config: RunConfig) -> bool:
    if spec.model.name == config.model.name:
        return True
    # The same local folder reached by another path (another machine, a relative path).
    return spec.model.revision.startswith("local:") and Path(config.model.name).is_dir() \
        and pinned_revision(config) == spec.model.revision


def data_differences(spec: RunSpec, config: RunConfig) -> list[str]:
    """The data files are compared by content where this machine has them; a fresh machine
    without them trains on the store's copy."""
    from .data import fingerprint

    found = []
    train = Path(config.data.train)
    if train.is_file() and fingerprint(train) != spec.data.sha256:
        found.append(f"data.train: {train} has other bytes (sha256 {fingerprint(train)[:12]}…) "
                     f"than the run's data ({spec.data.sha256[:12]}…, kept in the store at "
                     f"{spec.data.key})")
    ours, theirs = config.data.eval, spec.data.eval
    if isinstance(ours, str) != isinstance(theirs, str) or (
            not isinstance(ours, str) and ours != theirs):
        found.append(f"data.eval: the run has {theirs!r}, the config says {ours!r}")
    elif isinstance(ours, str) and Path(ours).is_file() \
            and fingerprint(Path(ours)) != spec.data.eval_sha256:
        found.append(f"data.eval: {ours} has other bytes than the run's eval data")
    return found


def local_inputs(runstore: RunStore, spec: RunSpec, config: RunConfig,
                 workdir: Path) -> tuple[Path, Optional[Path]]:
    """Local paths of the training and eval data, fetched from the store when this machine
    lacks them; every file is checked against the spec's sha256."""
    train = fetch_data(runstore, spec.data.key, spec.data.sha256, Path(config.data.train),
                       workdir)
    evaluation = None
    if spec.data.eval_key and spec.data.eval_sha256:
        given = Path(config.data.eval) if isinstance(config.data.eval, str) else Path("-")
        evaluation = fetch_data(runstore, spec.data.eval_key, spec.data.eval_sha256, given,
                                workdir)
    return train, evaluation


def fetch_data(runstore: RunStore, key: str, sha256: str, given: Path, workdir: Path) -> Path:
    from .data import check_fingerprint, fingerprint

    if given.is_file() and fingerprint(given) == sha256:
        return given
    cached = workdir / "data" / key.rsplit("/", 1)[-1]
    if cached.is_file() and fingerprint(cached) == sha256:
        return cached
    runstore.store.download(key, cached)
    check_fingerprint(cached, sha256, what="data downloaded from the store")
    return cached


# -- what the person sees ----------------------------------------------------------------

class Progress:
    """A live bar on a terminal; a plain line every `log_every` seconds elsewhere (notebook
    cells running `!python agent.py`, CI logs), where a live display would print nothing."""

    def __init__(self, start: int, total: int, clock: SessionClock,
                 log_every: Optional[float] = None):
        from rich.console import Console

        self.start, self.total, self.clock = start, total, clock
        self.console = Console(highlight=False, soft_wrap=True)
        self.log_every = 30.0 if log_every is None else log_every
        self.last_line = float("-inf")
        self.live = None

    def __enter__(self) -> "Progress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self.live = RichProgress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TextColumn("left {task.fields[left]}"), console=self.console)
            self.task = self.live.add_task("train", total=self.total, completed=self.start,
                                           loss="-", speed="-", left=self._left())
            self.live.start()
        return self

    def __exit__(self, *_exc) -> None:
        if self.live is not None:
            self.live.stop()

    def _left(self) -> str:
        return describe(self.clock.time_left())

    def update(self, result, record: SessionRecord) -> None:
        loss = "-" if result.loss is None else f"{result.loss:.4f}"
        speed = f"{record.tokens_per_s:,.0f}"
        if self.live is not None:
            self.live.update(self.task, completed=result.step, loss=loss, speed=speed,
                             left=self._left())
            return
        now = time.monotonic()
        if now - self.last_line >= self.log_every or result.step >= self.total:
            self.last_line = now
            self.console.print(f"step {result.step}/{self.total} loss {loss} lr {result.lr:.3g} "
                               f"{speed} tok/s, session left {self._left()}", markup=False)


class Say:
    """Messages for the person running the session, scrubbed of secrets."""

    def __init__(self, scrub: Callable[[str], str]):
        from rich.console import Console

        self.scrub = scrub
        # soft_wrap: a log line stays one line in a notebook cell or a CI log.
        self.console = Console(highlight=False, soft_wrap=True)
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def __call__(self, message: str) -> None:
        self.console.print(self.scrub(message), markup=False)

    def error(self, message: str, code: int) -> int:
        self.errors.print(self.scrub(f"baton: {message}"), markup=False)
        return code


@contextmanager
def stop_on_signals(flag: threading.Event, say: Say):
    """SIGTERM and SIGINT set `flag`; the loop stops at the next step boundary and commits."""
    def handler(signum, _frame):
        if not flag.is_set():
            say(f"{signal.Signals(signum).name} received: finishing this step, committing a "
                "checkpoint, then exiting (75)")
        flag.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for signum, previous in old.items():
            signal.signal(signum, previous)


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
        self.announce: Callable[[str], None] = lambda _message: None
        self.last = time.monotonic()
        self.committed_step: Optional[int] = None
        # No measured commit yet: checkpoint right after the first step to learn its cost.
        self.measure_first = clock.slowest_commit == 0.0

    def due(self) -> bool:
        if self.pending is not None:
            return False
        return self.measure_first or time.monotonic() - self.last >= self.every

    def save(self, trainer) -> tuple[Path, int, float]:
        """Eval loss and a local save, in the training thread; returns (folder, step, seconds)."""
        began = time.monotonic()
        step = trainer.cursor.step
        self.announce("save")  # the other ranks evaluate their share with us
        eval_loss = trainer.evaluate()
        if eval_loss is not None:
            self.record.eval_losses.append((step, float(eval_loss)))
        folder = self.staging / f"{step:08d}-{uuid.uuid4().hex[:6]}"
        shutil.rmtree(folder, ignore_errors=True)
        trainer.save(folder)
        seconds = time.monotonic() - began
        self.record.save_seconds.append(round(seconds, 3))
        return folder, step, seconds

    def _upload(self, folder: Path, step: int, finished: bool,
                cleanup: bool = True) -> tuple[int, float]:
        """Commit a saved folder (then remove it); (step, seconds)."""
        began = time.monotonic()
        try:
            commit_checkpoint(self.runstore, folder, step=step, generation=self.lease.generation,
                              finished=finished, keep=self.spec.keep)
        finally:
            if cleanup:
                shutil.rmtree(folder, ignore_errors=True)
        return step, time.monotonic() - began

    def _upload_or_spool(self, folder: Path, step: int, finished: bool):
        """The final upload. With the store down past the retries, the checkpoint goes to the
        local spool, which the next session on this machine pushes first (handoff/spool.py).
        Returns (upload seconds, None) or (0, Spooled)."""
        from handoff.spool import spool

        try:
            return self._upload(folder, step, finished, cleanup=False)[1], None
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
        except Exception as exc:  # noqa: BLE001 - an outage must not end the session
            log.warning("background checkpoint failed (%s: %s); the next one retries",
                        type(exc).__name__, exc)
            return False
        self._committed(step, future.save_seconds, upload_s)  # type: ignore[attr-defined]
        return True

    def _committed(self, step: int, save_s: float, upload_s: float) -> None:
        self.committed_step = step
        self.record.upload_seconds.append(round(upload_s, 3))
        self.clock.observe_commit(save_s + upload_s)

    def commit_now(self, trainer, finished: bool):
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


class Session:
    """The body of `agent.py run` once the spec is settled."""

    def __init__(self, config: RunConfig, options: SessionOptions, runstore: RunStore,
                 spec: RunSpec, clock: SessionClock, say: Say, ranks: "Ranks"):
        self.config, self.options, self.runstore = config, options, runstore
        self.spec, self.clock, self.say, self.ranks = spec, clock, say, ranks
        self.workdir = Path(options.workdir or Path.home() / ".cache" / "baton" / config.run)
        self.stop = threading.Event()
        self.lease: Optional[LeaseManager] = None
        self.record: Optional[SessionRecord] = None

    def ttl(self) -> float:
        if self.options.lease_ttl:
            return self.options.lease_ttl
        return HUB_LEASE_TTL if self.config.store.startswith("hf://") else LEASE_TTL

    def run(self, agent_start: float) -> int:
        from .devices import UnsupportedGPUError, detect_device

        try:
            device = detect_device()
        except UnsupportedGPUError as exc:
            return self.say.error(str(exc), INVALID)
        self.lease = LeaseManager(self.runstore, gpu=device.name, ttl=self.ttl())
        try:
            self.lease.acquire(takeover=self.options.takeover)
        except LeaseHeldError as exc:
            return self.say.error(str(exc), HELD)
        self.record = SessionRecord(
            session_id=f"{utc_iso(agent_start).replace(':', '')[:17]}-{self.lease.holder[:8]}",
            host=self.lease.host, gpu=device.name, gpu_count=device.gpu_count,
            precision=device.precision, started=datetime.fromtimestamp(agent_start, timezone.utc))
        return self._guarded(device)

    def _guarded(self, device) -> int:
        """Train; map what went wrong to an exit code; always leave the record and the lease
        in order, except after losing the lease, when nothing may be written."""
        code, lost = FAILED, False
        try:
            self.runstore.write_session(self.record)
            self.lease.start_heartbeat(self.lease.ttl / 3)
            with stop_on_signals(self.stop, self.say):
                code = self.train(device)
        except (FencedError, LeaseLostError) as exc:
            lost = True
            return self.say.error(f"{exc}\nAnother agent owns run {self.config.run!r} now; "
                                  "this session stopped without writing anything.", FAILED)
        except (SpecError, DataError) as exc:
            code = self.say.error(str(exc), INVALID)
        except (CorruptCheckpointError, StoreUnavailableError) as exc:
            code = self.say.error(f"{exc}\nThe store was left as it was.", FAILED)
        finally:
            self._finish(code, lost)
        return code

    def _finish(self, code: int, lost: bool) -> None:
        if lost:
            self.lease.stop_heartbeat()
            return
        self.record.exit_code = code
        self.record.ended = datetime.now(timezone.utc)
        try:
            self.runstore.write_session(self.record)
        finally:
            self.lease.release()

    def train(self, device) -> int:
        self._push_spool()
        ref = pull_checkpoint(self.runstore, self.workdir / "checkpoint")
        if ref is not None and ref.fell_back:
            self.say(f"warning: checkpoint {ref.previous_bad} failed verification; resuming "
                     f"from the one before it, {ref.id} (step {ref.step})")
        if self._should_stop():  # the session is already over: loading the model is waste
            self.say("paused before training: the session's time is spent (or a signal came); "
                     "nothing was changed")
            return PAUSED
        data_path, eval_path = local_inputs(self.runstore, self.spec, self.config, self.workdir)
        self.ranks.plan(self.spec, data_path, eval_path, ref.path if ref else None)
        trainer = self._trainer(device, ref, data_path, eval_path)
        checkpoints = Checkpointer(self.runstore, self.lease, self.spec, self.workdir,
                                   self.record, self.clock,
                                   parse_duration(self.config.checkpoint.every))
        checkpoints.announce = self.ranks.tell
        if ref is not None:
            checkpoints.committed_step = ref.step
        try:
            return self._loop(trainer, checkpoints)
        finally:
            checkpoints.close()

    def _push_spool(self) -> None:
        """A checkpoint an earlier session here could not upload goes to the store first."""
        from handoff.spool import push_pending

        for cid in push_pending(self.runstore, self.workdir, self.lease.generation,
                                keep=self.spec.keep):
            self.say(f"pushed checkpoint {cid}, kept on this machine by an earlier session "
                     "while the store was down")

    def _trainer(self, device, ref, data_path: Path, eval_path: Optional[Path]):
        from .engine import Trainer

        trainer = Trainer(self.spec, data_path=data_path, eval_path=eval_path,
                          micro_batch_size=self.config.train.micro_batch_size,
                          device=device.device)
        if ref is not None:
            trainer.load(ref.path)
        self.record.start_step = self.record.end_step = trainer.cursor.step
        self.record.kernels = getattr(trainer.device_info, "kernels", "none")
        self.say(f"run {self.config.run!r}: step {trainer.cursor.step}/"
                 f"{trainer.cursor.total_steps} on {device.name}{self.ranks.describe()} "
                 f"({device.precision}, kernels "
                 f"{self.record.kernels}), lease generation {self.lease.generation}")
        return trainer

    def _loop(self, trainer, checkpoints: Checkpointer) -> int:
        with Progress(trainer.cursor.step, trainer.cursor.total_steps, self.clock,
                      self.options.log_every) as bar:
            while not trainer.finished and not self._should_stop():
                self.ranks.tell("step")
                result = trainer.train_step()
                self._observe(result)
                bar.update(result, self.record)
                if checkpoints.poll():
                    self.runstore.write_session(self.record)
                if checkpoints.due() and self.clock.room_for_commit():
                    checkpoints.start(trainer)
        self.lease.check()
        return self._last_commit(trainer, checkpoints)

    def _should_stop(self) -> bool:
        self.lease.check()
        return self.stop.is_set() or self.clock.should_stop()

    def _observe(self, result) -> None:
        self.clock.observe_step(result.seconds)
        rec = self.record
        rec.end_step = result.step
        rec.tokens += int(result.tokens)
        rec.train_seconds += result.seconds
        rec.slowest_step_s = max(rec.slowest_step_s, result.seconds)
        if result.loss is not None:
            rec.losses.append((result.step, float(result.loss)))

    def _last_commit(self, trainer, checkpoints: Checkpointer) -> int:
        finished = bool(trainer.finished)
        spooled = checkpoints.commit_now(trainer, finished)
        if spooled is not None:
            from handoff.spool import describe as describe_spool

            return self.say.error(describe_spool(spooled), FAILED)
        step, total = trainer.cursor.step, trainer.cursor.total_steps
        if finished:
            self.say(f"run {self.config.run!r} finished: step {step}/{total} committed")
            return FINISHED
        why = "signal" if self.stop.is_set() else "session time nearly spent"
        self.say(f"paused ({why}) at step {step}/{total}, checkpoint committed; run the same "
                 "command in the next session to continue")
        return PAUSED


# -- more than one GPU: rank 0 runs the session, the other ranks follow ---------------------

class Ranks:
    """The ranks of a data-parallel session (agent.py starts one process a GPU). Rank 0 alone
    talks to the store; it broadcasts the plan (spec, data, checkpoint), then one word before
    each collective the others must join: "step", "save" (eval is collective), "stop"."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.planned = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f" x{self.world} ranks (DDP)" if self.world > 1 else ""

    def start(self) -> None:
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:  # CPU ranks (tests): share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
            backend = "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=10))

    def tell(self, message) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list([message], src=0)

    def hear(self):
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def plan(self, spec: RunSpec, data: Path, evaluation: Optional[Path],
             checkpoint: Optional[Path]) -> None:
        self.planned = True
        self.tell({"spec": spec.model_dump_json(), "data": str(data), "checkpoint":
                   str(checkpoint) if checkpoint else None,
                   "eval": str(evaluation) if evaluation else None})

    def close(self, code: int) -> None:
        """Rank 0 releases the followers (with its exit code if they never got a plan)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if self.leader:
            self.tell("stop" if self.planned else {"code": code})
        dist.destroy_process_group()


def follow(config: RunConfig, ranks: Ranks) -> int:
    """A rank other than 0: train the steps rank 0 announces on this rank's share."""
    from .engine import Trainer

    for signum in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop
        signal.signal(signum, signal.SIG_IGN)
    plan = ranks.hear()
    if "code" in plan:
        return plan["code"]
    trainer = Trainer(RunSpec.from_json(plan["spec"]), data_path=Path(plan["data"]),
                      eval_path=Path(plan["eval"]) if plan["eval"] else None,
                      micro_batch_size=config.train.micro_batch_size)
    if plan["checkpoint"]:
        trainer.load(Path(plan["checkpoint"]))
    while (word := ranks.hear()) != "stop":
        if word == "step":
            trainer.train_step()
        elif word == "save":
            trainer.evaluate()
    return FINISHED
