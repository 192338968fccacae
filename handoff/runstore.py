"""Typed access to one run's documents in a store (DESIGN.md, "Layout of a run").

Everything here is a thin mapping between keys and the pydantic models of `state_schema`; the
concurrency rules (who may move HEAD, who holds the lease) live in lease.py and checkpoint.py.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from baton.state_schema import Head, Lease, Manifest, RunSpec, SchemaError, SessionRecord
from baton.state_schema import check_run_name

from .errors import ConflictError
from .store import ABSENT, Expect, Store

log = logging.getLogger("baton.store")

# "<step:08d>-g<generation>": zero-padded steps sort as text, generations need parsing.
CHECKPOINT_ID = re.compile(r"^(\d{8,})-g(\d+)$")


def parse_checkpoint_id(checkpoint: str) -> tuple[int, int]:
    """'00000120-g3' -> (120, 3); ValueError for a name that is not a checkpoint id."""
    match = CHECKPOINT_ID.match(checkpoint)
    if not match:
        raise ValueError(f"{checkpoint!r} is not a checkpoint id like '00000120-g3'")
    return int(match.group(1)), int(match.group(2))


class RunStore:
    """One run inside a store: `<run>/spec.json`, `HEAD.json`, `lease.json`, checkpoints..."""

    def __init__(self, store: Store, run: str):
        self.store = store
        self.run = check_run_name(run)

    def __repr__(self) -> str:
        return f"RunStore({self.store.uri!r}, {self.run!r})"

    def key(self, *parts: str) -> str:
        return "/".join([self.run, *parts])

    def checkpoint_key(self, checkpoint: str, name: str = "") -> str:
        """Key of a file in a checkpoint folder; with no name, the folder prefix ('.../')."""
        return self.key("checkpoints", checkpoint, name) if name else \
            self.key("checkpoints", checkpoint) + "/"

    # -- spec ----------------------------------------------------------------------------

    def read_spec(self) -> Optional[RunSpec]:
        got = self.store.read_optional(self.key("spec.json"))
        if got is None:
            return None
        return RunSpec.from_json(got.data, source=self._where("spec.json"))

    def create_spec(self, spec: RunSpec) -> None:
        """Write the spec once; ConflictError if the run already has one."""
        try:
            self.store.write(self.key("spec.json"), spec.to_json(), expect=ABSENT)
        except ConflictError as exc:
            raise ConflictError(
                f"run {self.run!r} already exists in {self.store.uri}; read its spec instead, "
                "or choose another run name"
            ) from exc

    # -- HEAD and lease: versioned, changed only by conditional writes ---------------------

    def read_head(self) -> Optional[tuple[Head, str]]:
        return self._read_versioned("HEAD.json", Head)

    def write_head(self, head: Head, *, expect: Expect) -> str:
        return self.store.write(self.key("HEAD.json"), head.to_json(), expect=expect)

    def read_lease(self) -> Optional[tuple[Lease, str]]:
        return self._read_versioned("lease.json", Lease)

    def write_lease(self, lease: Lease, *, expect: Expect) -> str:
        return self.store.write(self.key("lease.json"), lease.to_json(), expect=expect)

    def _read_versioned(self, name: str, model):
        got = self.store.read_optional(self.key(name))
        if got is None:
            return None
        return model.from_json(got.data, source=self._where(name)), got.version

    # -- sessions ------------------------------------------------------------------------

    def write_session(self, record: SessionRecord) -> None:
        """sessions/<id>.json; each session writes only its own record, so no condition."""
        self.store.write(self.key("sessions", f"{record.session_id}.json"), record.to_json())

    def read_sessions(self) -> list[SessionRecord]:
        """Every readable session record, oldest start first; unreadable ones are skipped
        with a warning, since history must never stop a run from continuing."""
        records = []
        for key in self.store.list(self.key("sessions") + "/"):
            if not key.endswith(".json"):
                continue
            got = self.store.read_optional(key)
            if got is None:
                continue  # deleted between list and read
            try:
                records.append(SessionRecord.from_json(got.data, source=f"{self.store.uri}/{key}"))
            except SchemaError as exc:
                log.warning("skipping session record: %s", exc)
        return sorted(records, key=lambda r: r.started)

    # -- data and checkpoints ------------------------------------------------------------

    def upload_data(self, path: Path, sha256: str, ext: str) -> str:
        """Upload the training data once under its content hash; return its key."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"sha256 {sha256!r} should be 64 lowercase hex digits")
        key = self.key("data", f"{sha256}.{ext.lstrip('.')}")
        if key not in self.store.list(self.key("data") + "/"):
            self.store.upload(key, Path(path))
        return key

    def list_checkpoints(self) -> list[str]:
        """Checkpoint ids found in the store, oldest (step, generation) first, whether or not
        their manifest is written yet."""
        prefix = self.key("checkpoints") + "/"
        ids = set()
        for key in self.store.list(prefix):
            name = key[len(prefix):].split("/", 1)[0]
            if CHECKPOINT_ID.match(name):
                ids.add(name)
        return sorted(ids, key=parse_checkpoint_id)

    def read_manifest(self, checkpoint: str) -> Optional[Manifest]:
        """The manifest of a checkpoint; None while its upload is incomplete (or was cut)."""
        got = self.store.read_optional(self.checkpoint_key(checkpoint, "manifest.json"))
        if got is None:
            return None
        source = self._where(f"checkpoints/{checkpoint}/manifest.json")
        return Manifest.from_json(got.data, source=source)

    def _where(self, name: str) -> str:
        return f"{self.store.uri.rstrip('/')}/{self.key(name)}"
