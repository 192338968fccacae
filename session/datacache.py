"""The run's encoded data, kept in its store so that a run tokenizes and packs once.

The engine (training/encoded.py) decides what the file holds and its key; this module, where
the training and handoff layers meet, decides where it lives:

    <run>/cache/encoded/<key>.json            EncodedManifest: file, sha256, size
    <run>/cache/encoded/<sha256>.safetensors  the file, named by its content

and keeps a local copy in the workdir (`data/encoded-<key>.safetensors`), so a later session
on the same machine downloads nothing. Like a checkpoint, nothing is trusted unverified: a copy
whose sha256 or size differs from the manifest, a manifest that does not parse, or a manifest
whose file is gone is a miss, and the data is encoded again. The manifest is written last and
create-if-absent (two machines may race; the loser's file has the same name when its bytes are
the same, and the winner's manifest stands), or, replacing a bad one, on condition of the
version that was read. The cache only saves time: a store that fails while it is read or
written costs an encoding, never the session.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from baton.handoff import ConflictError, NotFoundError, StoreError
from baton.handoff.checkpoint import sha256_file
from baton.handoff.runstore import RunStore
from baton.handoff.store import ABSENT, Expect
from baton.state_schema import EncodedManifest, SchemaError

log = logging.getLogger("baton.session")


class StoreEncodedCache:
    """training.encoded.EncodedCache over a run's store and a local workdir."""

    def __init__(self, runstore: RunStore, workdir: Path,
                 say: Optional[Callable[[str], None]] = None):
        self.runstore = runstore
        self.workdir = Path(workdir)
        self.say = say or log.info
        self._replace: dict[str, Expect] = {}  # key -> version of a bad manifest to replace
        self.hits = 0  # fetches that found a verified copy (tests and status read these)
        self.downloads = 0

    def manifest_key(self, key: str) -> str:
        return self.runstore.key("cache", "encoded", f"{key}.json")

    def local_path(self, key: str) -> Path:
        return self.workdir / "data" / f"encoded-{key}.safetensors"

    def fetch(self, key: str) -> Optional[Path]:
        manifest = self._manifest(key)
        if manifest is None:
            return None
        local = self.local_path(key)
        if not self._verified(local, manifest):
            try:
                self.runstore.store.download(manifest.file, local)
            except NotFoundError:
                return self._miss(key, f"its file {manifest.file} is missing")
            except StoreError as exc:
                log.warning("encoded data not downloaded (%s); encoding it here", exc)
                return None
            self.downloads += 1
            if not self._verified(local, manifest):
                local.unlink(missing_ok=True)
                return self._miss(key, f"{manifest.file} failed verification (sha256 or size)")
        self.hits += 1
        self.say(f"data: encoded once for the run, loaded from {manifest.file.rsplit('/', 1)[-1]}"
                 f" ({manifest.size / 1e6:.1f} MB, verified)")
        return local

    def keep(self, key: str, path: Path) -> None:
        sha = sha256_file(path)
        file_key = self.runstore.key("cache", "encoded", f"{sha}.safetensors")
        manifest = EncodedManifest(key=key, file=file_key, sha256=sha, size=path.stat().st_size)
        expect = self._replace.pop(key, ABSENT)
        try:
            self.runstore.store.publish({file_key: path}, self.manifest_key(key),
                                        manifest.to_json(), expect=expect)
        except ConflictError:  # another session stored it first: its manifest stands
            log.info("encoded data for this run was stored by another session meanwhile")
            return
        except StoreError as exc:
            log.warning("encoded data not stored (%s); the next session encodes it again", exc)
            return
        self.say(f"data: encoded once for the run and stored as {file_key} "
                 f"({manifest.size / 1e6:.1f} MB); later sessions load it")

    def _manifest(self, key: str) -> Optional[EncodedManifest]:
        where = self.manifest_key(key)
        try:
            got = self.runstore.store.read_optional(where)
        except StoreError as exc:
            log.warning("encoded-data cache unreadable (%s); encoding the data here", exc)
            return None
        if got is None:
            return None
        # A manifest found is replaced (on condition of this version) only if it or its file
        # turns out bad and the data is encoded again.
        self._replace[key] = got.version
        try:
            manifest = EncodedManifest.from_json(got.data, source=where)
        except SchemaError as exc:
            return self._miss(key, str(exc))
        if manifest.key != key:
            return self._miss(key, f"{where} names key {manifest.key[:12]}…")
        return manifest

    def _miss(self, key: str, why: str) -> None:
        self.say(f"warning: the encoded-data cache is not usable ({why}); encoding the data "
                 "again and replacing it")
        return None

    @staticmethod
    def _verified(local: Path, manifest: EncodedManifest) -> bool:
        return local.is_file() and local.stat().st_size == manifest.size \
            and sha256_file(local) == manifest.sha256
