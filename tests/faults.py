"""Test hooks for an agent in a subprocess: kill points, quick retries, a short lease.

Kill points let a test SIGKILL the agent at a chosen moment, as a lost VM would die.

`BATON_KILLPOINT=name` or `name:N` makes the process SIGKILL itself the N-th time (default
the first) it passes `killpoint(name)`. SIGKILL, not an exception: no `finally`, no signal
handler, no flush runs, which is exactly what a preempted notebook or an OOM kill leaves behind.

Names:
    upload       between the files of a checkpoint upload (some files landed, no manifest)
    before_head  files and manifest uploaded, HEAD not moved yet
    renew        inside a lease renewal, before its write
    step         inside a train step, before it runs
    load         when the trainer loads the model (as an out-of-memory kill would)

`BATON_KILLPOINT_RANK=r` limits the kill to the rank whose RANK is r in a multi-rank session
(the agent's ranks run this same entry point, so every rank has the hooks): a dead rank 1.
`BATON_HANG=name[:N]` (with `BATON_HANG_RANK=r`) blocks that rank there for good instead, as a
rank does in an NCCL collective whose peer died: Python's signal handlers run, nothing returns.

The product never calls `killpoint`: `install_from_env()` wraps the places above by replacing
the methods, and tests/agent_entry.py installs it before it runs agent.py's main. The same
entry point shortens the store's retries (`BATON_TEST_RETRY=attempts,seconds`) and its lease
(`BATON_TEST_LEASE_TTL=seconds`), settings a test needs and a person never does.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Optional

ENV = "BATON_KILLPOINT"
RETRY_ENV = "BATON_TEST_RETRY"
LEASE_TTL_ENV = "BATON_TEST_LEASE_TTL"
RANK_ENV = "BATON_KILLPOINT_RANK"
HANG_ENV = "BATON_HANG"
HANG_RANK_ENV = "BATON_HANG_RANK"
OVERFLOW_ENV = "BATON_OVERFLOW_AT"
PROBE_FAULT_ENV = "BATON_PROBE_FAULT"
NAMES = ("upload", "before_head", "renew", "step", "load")
ANNOUNCE = "baton-killpoint:"  # the line a killed process writes to stderr just before dying

_passes: Counter = Counter()
_lock = threading.Lock()  # the heartbeat thread and the upload thread pass kill points too
_installed = False


class KillpointError(ValueError):
    """BATON_KILLPOINT names no known kill point or has a bad count."""


def parse(spec: str) -> tuple[str, int]:
    """'upload' -> ('upload', 1); 'step:3' -> ('step', 3)."""
    name, _, count = spec.strip().partition(":")
    if name not in NAMES:
        raise KillpointError(f"{ENV}={spec!r}: unknown kill point {name!r}; use one of "
                             f"{', '.join(NAMES)}, optionally with ':N' (the N-th pass)")
    try:
        nth = int(count) if count else 1
    except ValueError:
        raise KillpointError(f"{ENV}={spec!r}: the count after ':' must be a whole number")
    if nth < 1:
        raise KillpointError(f"{ENV}={spec!r}: the count after ':' starts at 1")
    return name, nth


def target() -> Optional[tuple[str, int]]:
    spec = os.environ.get(ENV)
    return parse(spec) if spec else None


def killpoint(name: str) -> None:
    """SIGKILL this process if BATON_KILLPOINT names `name` and this is its N-th pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted, nth = parse(spec)
    if wanted != name or not _this_rank():
        return
    with _lock:
        _passes[name] += 1
        count = _passes[name]
    if count == nth:
        # One line so that a test can tell a kill point's death from any other.
        os.write(sys.stderr.fileno(), f"{ANNOUNCE} {name}:{count}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def _this_rank(variable: str = RANK_ENV) -> bool:
    """True unless `variable` names another rank than this process's."""
    only = os.environ.get(variable)
    return only is None or os.environ.get("RANK") == only


def hangpoint(name: str) -> None:
    """Block forever if BATON_HANG names `name`, this is its N-th pass and the rank matches."""
    spec = os.environ.get(HANG_ENV)
    if not spec or parse(spec)[0] != name or not _this_rank(HANG_RANK_ENV):
        return
    with _lock:
        _passes[f"hang:{name}"] += 1
        count = _passes[f"hang:{name}"]
    if count == parse(spec)[1]:
        os.write(sys.stderr.fileno(), f"baton-hang: {name}:{count}\n".encode())
        while True:
            time.sleep(3600)


def passes(name: str) -> int:
    """How many times `killpoint(name)` was passed in this process (for tests)."""
    with _lock:
        return _passes[name]


# -- wrapping the kill sites, for an agent whose code does not call killpoint() ---------------

def install_from_env() -> bool:
    """Wrap the kill sites when BATON_KILLPOINT or BATON_HANG is set; False (nothing done)
    when neither is.

    Idempotent. Imports the engine (torch) only when the variable names `step`."""
    global _installed
    hang = os.environ.get(HANG_ENV)
    names = {spec[0] for spec in (target(), parse(hang) if hang else None) if spec}
    if not names or _installed:
        return _installed
    _wrap_publish()
    _wrap_renew()
    if "step" in names:
        _wrap_train_step()
    if "load" in names:
        _wrap_load_model()
    _installed = True
    return True


def install_overflow_from_env() -> bool:
    """BATON_OVERFLOW_AT=N: from the N-th train step on, the forward overflows fp16."""
    at = os.environ.get(OVERFLOW_ENV)
    if not at:
        return False
    from baton.training.engine import Trainer

    Trainer.train_step = overflowing(Trainer.train_step, int(at))
    return True


def overflowing(train_step, nth: int):
    """`Trainer.train_step` that blows the LoRA weights up just before the nth step."""
    @functools.wraps(train_step)
    def wrapped(self):
        self._test_steps = getattr(self, "_test_steps", 0) + 1
        if self._test_steps == nth:
            blow_up_lora(self.model)
        return train_step(self)

    return wrapped


def install_probe_fault_from_env() -> bool:
    """BATON_PROBE_FAULT: the probe's child is tests/probe_entry.py, which injects it."""
    if not os.environ.get(PROBE_FAULT_ENV):
        return False
    from baton.session import probe

    probe.probe_command = faulty_probe_command
    return True


def faulty_probe_command() -> list[str]:
    """The kernel probe's child behind tests/probe_entry.py (which reads BATON_PROBE_FAULT)."""
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "probe_entry.py")]


def blow_up_lora(model, value: float = 1e6) -> int:
    """Set every LoRA B of `model` to `value`: finite in fp32, inf in any fp16 matmul."""
    import torch

    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(value)
                count += 1
    return count


def install_test_settings() -> None:
    """Quick retries and a short lease for every store the agent opens, when asked."""
    from baton.handoff.retry import RetryPolicy
    from baton.handoff.store import REGISTRY, Store

    if os.environ.get(RETRY_ENV):
        attempts, _, seconds = os.environ[RETRY_ENV].partition(",")
        Store.retry = RetryPolicy(attempts=int(attempts), max_seconds=float(seconds or 120))
    if os.environ.get(LEASE_TTL_ENV):
        ttl = float(os.environ[LEASE_TTL_ENV])
        for module, cls, _package in REGISTRY.values():  # each backend may set its own
            setattr(getattr(importlib.import_module(module), cls), "lease_ttl", ttl)


def _wrap_publish() -> None:
    """Store.publish of the backends that upload files, then write HEAD (local, S3): the
    Hub's publish is one commit, where neither kill point can fall between its parts."""
    from baton.handoff.store import Store

    def publish(self, files, key, data, *, expect):
        for index, (name, path) in enumerate(files.items()):
            if index:
                killpoint("upload")
            self.upload(name, path)
        killpoint("before_head")
        return self.write(key, data, expect=expect)

    Store.publish = publish


def _wrap_renew() -> None:
    from baton.handoff.lease import LeaseManager

    LeaseManager.renew = _before(LeaseManager.renew, "renew")


def _wrap_train_step() -> None:
    from baton.training.engine import Trainer

    Trainer.train_step = _before(Trainer.train_step, "step")


def _wrap_load_model() -> None:
    from baton.training import engine

    engine.load_model = _before(engine.load_model, "load")  # the name Trainer calls


def _before(method, name: str):
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        killpoint(name)
        hangpoint(name)
        return method(*args, **kwargs)

    return wrapped
