"""A store in a local folder (or a mounted drive): the embedded default.

Conditional writes hold an exclusive `flock` on a per-key lock file while they compare and
`os.replace` the object, so racing processes on one machine serialize; a process killed while
holding the lock releases it with its file descriptors, so no stale lock survives a SIGKILL.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .errors import ConflictError, NotFoundError, StoreConfigError
from .retry import RetryPolicy
from .store import ABSENT, Expect, Store, Versioned, check_key

LOCK_SUFFIX = ".lock"


def _token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStore(Store):
    def __init__(self, uri: str, *, retry: Optional[RetryPolicy] = None):
        self.uri = uri
        if retry is not None:  # kept for a uniform interface: a folder never retries
            self.retry = retry
        root = uri[len("file://"):] if uri.startswith("file://") else uri
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreConfigError(f"store {uri!r} is a file, not a folder; name a folder")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def read(self, key: str) -> Versioned:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFoundError(f"{key} not found in {self.uri}") from exc
        return Versioned(data, _token(data))

    @contextmanager
    def _locked(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + LOCK_SUFFIX), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, key: str, data: bytes, *, expect: Expect = None) -> str:
        path = self._path(key)
        with self._locked(path):
            if expect is not None:
                current = path.read_bytes() if path.exists() else None
                if expect is ABSENT and current is not None:
                    raise ConflictError(f"{key} already exists")
                if expect is not ABSENT and (current is None or _token(current) != expect):
                    raise ConflictError(f"{key} changed since it was read")
            self._atomic_write(path, data)
        return _token(data)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def upload(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{key} not found in {self.uri}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.endswith(LOCK_SUFFIX) and not p.name.startswith("."):
                keys.append(p.relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        # The lock file stays: unlinking it under a waiting writer would give two lock holders.
        self._path(key).unlink(missing_ok=True)
