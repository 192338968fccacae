"""One session of a run: spec, lease, pull, train until the clock says stop, commit, release.

The order is what keeps the run safe: everything that can be refused (the config against the
stored spec, the data, the lease) is checked before anything is written; the lease's generation
fences every HEAD move, so a session that lost its lease stops without writing; the last
checkpoint is committed synchronously before the deadline or after a signal, and only then is
the lease released. Heavy modules (torch, the engine) are imported inside functions so that
`agent.py` can import this module right after validating the config.

The spec lives in spec.py, checkpoints in checkpointer.py, the ranks of a multi-GPU session in
ranks.py, and what the person sees in progress.py.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from baton.handoff import (
    CorruptCheckpointError,
    FencedError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from baton.handoff.checkpoint import pull_checkpoint
from baton.handoff.lease import LeaseHeldError, LeaseLostError, LeaseManager
from baton.handoff.runstore import RunStore
from baton.handoff.spool import describe as describe_spool
from baton.handoff.spool import push_pending
from baton.state_schema import RunConfig, RunSpec, SchemaError, SessionRecord, parse_duration
from baton.training.data import DataError  # stdlib only: light enough for the CLI's first second
from baton.training.hub_data import DatasetUnavailableError
from baton.training.model import ModelUnavailableError

from .checkpointer import Checkpointer
from .clock import SessionClock, describe, parse_start, resolve_window, utc_iso
from .codes import FAILED, FINISHED, HELD, INVALID, PAUSED, default_workdir
from .compile_cache import keep_compile_cache
from .datacache import StoreEncodedCache
from .evals import EvalSchedule
from .notify import Report, notify_end
from .overflow import LossGuard, NonFiniteLossError
from .probe import decide as decide_kernels
from .progress import Progress, Say
from .ranks import Ranks, follow, word_wait_s
from .spec import SpecError, local_inputs, prepare_spec
from .timings import Timings

log = logging.getLogger("baton.session")


class DeviceError(ValueError):
    """This machine cannot train the run as asked (GPU, precision, kernel path): exit 2."""


@dataclass
class SessionOptions:
    takeover: bool = False
    workdir: Optional[Path] = None
    log_every: Optional[float] = None  # seconds between progress lines off a terminal
    validated_at: Optional[float] = None  # Unix time agent.py had a valid config (timings)


def run_session(config: RunConfig, options: SessionOptions) -> int:
    """Run one session of `config.run`; return the exit code DESIGN.md defines. Under a
    multi-GPU launch (agent.py sets RANK), rank 0 runs the session and the others follow."""
    keep_compile_cache(Path(options.workdir or default_workdir(config.run)))  # every rank
    ranks = Ranks()
    ranks.start(word_wait_s(config))
    code = FAILED
    try:
        code = _lead(config, options, ranks) if ranks.leader else follow(config, ranks)
    finally:
        ranks.close(code)
    return code


def _lead(config: RunConfig, options: SessionOptions, ranks: Ranks) -> int:
    """The session, then one notification of how it ended (never changing the code)."""
    say, report = Say(), Report(config.run)
    code: Optional[int] = None
    try:
        code = _open_and_run(config, options, ranks, say, report)
        return code
    except Exception as exc:
        code = FAILED  # agent.py reports the traceback; the notification says what it was
        say.last_error = f"unexpected error: {type(exc).__name__}: {exc}"
        raise
    finally:
        if code is not None:  # None: KeyboardInterrupt before the session began
            notify_end(config.notify, report, code, say.last_error)


def _open_and_run(config: RunConfig, options: SessionOptions, ranks: Ranks, say: Say,
                  report: Report) -> int:
    agent_start = time.time()
    timings = Timings(validated=options.validated_at)
    try:
        store = open_store(config.store)
    except StoreConfigError as exc:
        return say.error(str(exc), INVALID)
    try:
        return _run_in(RunStore(store, config.run), config, options, agent_start, say, ranks,
                       report, timings)
    except (SpecError, DeviceError, StoreConfigError, SchemaError) as exc:
        return say.error(str(exc), INVALID)
    except StoreUnavailableError as exc:
        return say.error(f"{exc}\nNothing was trained; run again when the store answers.",
                         FAILED)
    except (ModelUnavailableError, DatasetUnavailableError) as exc:
        return say.error(f"{exc}\nNothing was written; run again when the Hub answers.", FAILED)
    finally:
        store.close()


def _run_in(runstore: RunStore, config: RunConfig, options: SessionOptions,
            agent_start: float, say: Say, ranks: Ranks, report: Report,
            timings: Optional[Timings] = None) -> int:
    device = this_device(config)  # a device that cannot train is refused before any write
    spec = prepare_spec(runstore, config)
    head = runstore.read_head()
    report.step = head[0].step if head else None
    if head and head[0].finished:
        say(f"run {config.run!r} is finished (step {head[0].step}, checkpoint "
            f"{head[0].checkpoint}); merge it with scripts/merge.py")
        return FINISHED
    records = runstore.read_sessions()
    clock = build_clock(config, runstore, agent_start, say, records)
    session = Session(config, options, runstore, spec, clock, say, ranks)
    session.report, session.prior = report, records
    if timings is not None:
        session.timings = timings
    session.timings.window(clock.start, clock.limit)
    return session.run(agent_start, device)


def this_device(config: RunConfig):
    """The device, its precision and the kernel path; DeviceError says why it cannot train."""
    from baton.kernels.dispatch import select_backend
    from baton.kernels.errors import KernelChoiceError
    from baton.training.devices import PrecisionError, UnsupportedGPUError, detect_device

    try:
        device = detect_device(precision=config.train.precision)
        select_backend(device.device)  # a BATON_KERNELS this machine cannot honour
    except (UnsupportedGPUError, PrecisionError, KernelChoiceError) as exc:
        raise DeviceError(str(exc)) from None
    return device


def build_clock(config: RunConfig, runstore: RunStore, agent_start: float, say,
                records: Optional[list] = None) -> SessionClock:
    window = resolve_window(parse_start(config.session.start, now=agent_start),
                            parse_duration(config.session.limit), agent_start=agent_start)
    records = runstore.read_sessions() if records is None else records
    clock = SessionClock(window.start, window.limit).seed_from_records(records)
    if window.limit is None:
        say(f"session started {utc_iso(window.start)} ({window.start_source}); no time limit")
    else:
        say(f"session started {utc_iso(window.start)} ({window.start_source}), limit "
            f"{describe(window.limit)} ({window.limit_source}); stopping with a margin of "
            f"{describe(clock.margin())} that grows with measured steps and commits")
    return clock


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


class Session:
    """The body of `agent.py run` once the spec is settled."""

    def __init__(self, config: RunConfig, options: SessionOptions, runstore: RunStore,
                 spec: RunSpec, clock: SessionClock, say: Say, ranks: Ranks):
        self.config, self.options, self.runstore = config, options, runstore
        self.spec, self.clock, self.say, self.ranks = spec, clock, say, ranks
        self.workdir = Path(options.workdir or default_workdir(config.run))
        self.stop = threading.Event()
        self.lease: Optional[LeaseManager] = None
        self.record: Optional[SessionRecord] = None
        self.report = Report(config.run)  # what the end-of-session notification tells
        self.timings = Timings()  # where the session's time goes (session/timings.py)
        self.prior: list[SessionRecord] = []  # earlier sessions' records (evals seed from them)

    def run(self, agent_start: float, device) -> int:
        self.lease = LeaseManager(self.runstore, gpu=device.name, holder=self.ranks.holder)
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
        except (CorruptCheckpointError, StoreUnavailableError, DatasetUnavailableError) as exc:
            code = self.say.error(f"{exc}\nThe store was left as it was.", FAILED)
        except NonFiniteLossError as exc:
            code = self.say.error(f"{exc}\nHEAD stays on {self._head_text()}.", FAILED)
        finally:
            self._finish(code, lost)
        return code

    def _finish(self, code: int, lost: bool) -> None:
        if self.report.total is not None:  # the trainer loaded: the record knows the step
            self.report.step = self.record.end_step
        self.report.loss = self.record.losses[-1][1] if self.record.losses else None
        if lost:
            self.lease.stop_heartbeat()
            return
        self.record.exit_code = code
        self.record.ended = datetime.now(timezone.utc)
        self.record.timings = self.timings.snapshot(self.record.ended.timestamp(),
                                                    tail=code == PAUSED)
        self._write_record()
        try:
            self.lease.release()
        except StoreError as exc:
            # The lease expires on its own; the next session waits at most one TTL for it.
            log.warning("lease not released (%s); it expires at its TTL", exc)

    def _head_text(self) -> str:
        try:
            head = self.runstore.read_head()
        except StoreError:
            return "the last committed checkpoint (the store did not answer just now)"
        if head is None or head[0].checkpoint is None:
            return "no checkpoint (none was committed yet)"
        return f"checkpoint {head[0].checkpoint} (step {head[0].step})"

    def _write_record(self) -> None:
        """The session record is bookkeeping: a store hiccup while writing it must not end a
        session that can still train and spool its checkpoint."""
        if self.record.ended is None:  # mid-session: the timings so far
            self.record.timings = self.timings.snapshot()
        try:
            self.runstore.write_session(self.record)
        except StoreError as exc:
            log.warning("session record not written (%s); retried at the next checkpoint", exc)

    def train(self, device) -> int:
        self.timings.lap("setup")  # store, spec, lease and record since the config was valid
        with self.timings.phase("pull"):
            self._push_spool()
            ref = pull_checkpoint(self.runstore, self.workdir / "checkpoint")
        if ref is not None and ref.fell_back:
            self.say(f"warning: checkpoint {ref.previous_bad} failed verification; resuming "
                     f"from the one before it, {ref.id} (step {ref.step})")
        if self._should_stop():  # the session is already over: loading the model is waste
            self.say("paused before training: the session's time is spent (or a signal came); "
                     "nothing was changed")
            return PAUSED
        with self.timings.phase("data"):
            data_path, eval_path = local_inputs(self.runstore, self.spec, self.config,
                                                self.workdir)
        with self.timings.phase("first_step"):  # the probe compiles what the first step runs
            rows = self.config.train.micro_batch_size * self.config.data.max_seq_len
            probe = decide_kernels(self.spec, device, self.say, rows)  # a child: an abort can't kill us
        self.record.kernels_probe = probe.note
        from .sharding_plan import choose_sharding, gpu_memory

        self.ranks.mode = choose_sharding(self.config, self.ranks.world, gpu_memory())
        self.ranks.plan(self.spec, data_path, eval_path, ref.path if ref else None, probe.path,
                        self.ranks.mode)
        trainer = self._trainer(device, ref, data_path, eval_path, probe.path)
        checkpoints = self._checkpointer(ref)
        try:
            return self._loop(trainer, checkpoints)
        finally:
            checkpoints.close()

    def _checkpointer(self, ref) -> Checkpointer:
        checkpoints = Checkpointer(self.runstore, self.lease, self.spec, self.workdir,
                                   self.record, self.clock,
                                   parse_duration(self.config.checkpoint.every))
        if self.runstore.store.shows_page:
            from .page import HubPage

            checkpoints.page = HubPage(self.runstore, self.spec, self.record, self.workdir)
        if ref is not None:
            checkpoints.committed_step = ref.step
        return checkpoints

    def _push_spool(self) -> None:
        """A checkpoint an earlier session here could not upload goes to the store first."""
        for cid in push_pending(self.runstore, self.workdir, self.lease.generation,
                                keep=self.spec.keep):
            self.say(f"pushed checkpoint {cid}, kept on this machine by an earlier session "
                     "while the store was down")

    def _trainer(self, device, ref, data_path: Path, eval_path: Optional[Path], kernels: str):
        from baton.training.engine import Trainer
        from baton.training.model import model_summary

        trainer = Trainer(self.spec, data_path=data_path, eval_path=eval_path,
                          micro_batch_size=self.config.train.micro_batch_size,
                          device=device.device, precision=device.precision, kernels=kernels,
                          padding_free=self.config.data.padding_free, phase=self.timings.phase,
                          data_cache=StoreEncodedCache(self.runstore, self.workdir, self.say),
                          sharding_mode=self.ranks.mode)
        self.say(f"model loaded in {self.timings.seconds['model_load']:.1f} s: "
                 f"{model_summary(self.spec, trainer.model)}")
        if ref is not None:
            with self.timings.phase("pull"):
                trainer.load(ref.path)
        self.record.start_step = self.record.end_step = trainer.cursor.step
        self.report.total = trainer.cursor.total_steps
        self.record.kernels = getattr(trainer.device_info, "kernels", "none")
        self.record.attention, self.record.padding_free = trainer.attention, trainer.padding_free
        self.record.kernels_unfused = getattr(trainer, "kernels_unfused", None)
        unfused = f"; unfused: {self.record.kernels_unfused}" if self.record.kernels_unfused else ""
        self.say(f"run {self.config.run!r}: step {trainer.cursor.step}/"
                 f"{trainer.cursor.total_steps} on {device.name}{self.ranks.describe()} "
                 f"({device.precision}, kernels {self.record.kernels}, attention "
                 f"{trainer.attention}{'' if trainer.padding_free else ', padded'}{unfused}), "
                 f"lease generation {self.lease.generation}")
        return trainer

    def _loop(self, trainer, checkpoints: Checkpointer) -> int:
        guard = LossGuard(trainer.device_info.precision)
        evals = EvalSchedule(self.config.eval.every, self.clock,
                             fallback_s=parse_duration(self.config.checkpoint.every))
        evals.seed_from_records(self.prior).attach(self.ranks.tell, self.timings, self.record)
        if trainer.needs_base:
            evals.evaluate(trainer)
        with Progress(trainer.cursor.step, trainer.cursor.total_steps, self.clock,
                      self.options.log_every) as bar:
            while not trainer.finished and not self._should_stop():
                with self.timings.phase("train" if self.record.steps else "first_step"):
                    self.ranks.tell("step")
                    result = trainer.train_step()
                    self._observe(result)
                    bar.update(result, self.record)
                guard.observe(result.step, result.loss)  # K non-finite in a row: exit 1
                evals.after_step()
                if evals.due(finished=trainer.finished):
                    evals.evaluate(trainer)
                with self.timings.phase("commit_stall"):
                    if checkpoints.poll():
                        self._write_record()
                    # In a run of non-finite steps a checkpoint would count untrained samples.
                    if checkpoints.due() and self.clock.room_for_commit() and guard.clean:
                        checkpoints.start(trainer)
        self.lease.check()
        self.record.timings = self.timings.snapshot()  # what the final commit's page shows
        with self.timings.phase("final_commit"):
            return self._last_commit(trainer, checkpoints)

    def _should_stop(self) -> bool:
        self.lease.check()
        return self.stop.is_set() or self.clock.should_stop()

    def _observe(self, result) -> None:
        self.clock.observe_step(result.seconds)
        rec = self.record
        rec.skipped_steps += int(result.skipped)
        rec.nonfinite_steps += int(not math.isfinite(result.loss))
        rec.end_step = result.step
        rec.tokens += int(result.tokens)
        rec.train_seconds += result.seconds
        rec.slowest_step_s = max(rec.slowest_step_s, result.seconds)
        if math.isfinite(result.loss):  # JSON has no inf/NaN
            rec.losses.append((result.step, float(result.loss)))

    def _last_commit(self, trainer, checkpoints: Checkpointer) -> int:
        finished = bool(trainer.finished)
        spooled = checkpoints.commit_now(trainer, finished)
        if spooled is not None:
            return self.say.error(describe_spool(spooled), FAILED)
        step, total = trainer.cursor.step, trainer.cursor.total_steps
        if finished:
            self.say(f"run {self.config.run!r} finished: step {step}/{total} committed")
            return FINISHED
        why = "signal" if self.stop.is_set() else "session time nearly spent"
        self.say(f"paused ({why}) at step {step}/{total}, checkpoint committed; run the same "
                 "command in the next session to continue")
        return PAUSED

