"""The store interface every backend implements, and the lazy registry of backends.

Keys are '/'-separated paths relative to the store's root (`run/HEAD.json`). The conditional
write is the one concurrency primitive: `expect=ABSENT` creates only if absent, `expect=<token>`
replaces only if the object is still at that version; the loser gets `ConflictError`.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import ConflictError, NotFoundError, StoreConfigError
from .retry import DEFAULT_POLICY, RetryPolicy


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()  # expect= value meaning "the object must not exist yet"
Expect = Union[_Absent, str, None]  # None: unconditional


@dataclass(frozen=True)
class Versioned:
    data: bytes
    version: str  # opaque token for write(expect=...)


KEY = re.compile(r"^(?!/)(?!.*//)(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9._\-/]+(?<!/)$")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root or mean different things per backend."""
    if not KEY.match(key):
        raise ValueError(f"invalid store key {key!r}: use letters, digits, '._-' and '/' only")
    return key


class Store(ABC):
    """A place that holds runs: a folder, an S3 prefix or a Hub repo.

    `retry` is how hard a networked backend tries before a fault is reported; `lease_ttl` is
    how long a lease taken in this store lasts between heartbeats (a property of the store:
    where each renewal costs a rate-limited commit, the lease is longer)."""

    uri: str
    retry: RetryPolicy = DEFAULT_POLICY
    lease_ttl: float = 600.0
    # A store whose root README.md is a web page (a Hub repo): each checkpoint commit also
    # rewrites the run's page there (session/card.py).
    shows_page: bool = False

    @abstractmethod
    def read(self, key: str) -> Versioned:
        """The object and its version token; NotFoundError if absent."""

    @abstractmethod
    def write(self, key: str, data: bytes, *, expect: Expect = None) -> str:
        """Store `data` at `key` on condition; return the new version token."""

    @abstractmethod
    def upload(self, key: str, path: Path) -> None:
        """Copy a local file to `key` (unconditional; large files are streamed)."""

    @abstractmethod
    def download(self, key: str, path: Path) -> None:
        """Copy `key` to a local file, replacing it atomically; NotFoundError if absent."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder: 'run/checkpoints/'), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; absent is not an error."""

    def publish(
        self, files: dict[str, Path], key: str, data: bytes, *, expect: Expect
    ) -> str:
        """Upload `files` then conditionally write `key`.

        Backends that can do both in one atomic change (the Hub: one commit) override this;
        elsewhere the files land first and a lost condition leaves them unreferenced."""
        for name, path in files.items():
            self.upload(name, path)
        return self.write(key, data, expect=expect)

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def read_optional(self, key: str) -> Optional[Versioned]:
        try:
            return self.read(key)
        except NotFoundError:
            return None

    def close(self) -> None:
        """Release connections or servers the backend holds."""


# scheme -> (module, class, pip package that provides the client)
REGISTRY: dict[str, tuple[str, str, Optional[str]]] = {
    "file": ("baton.handoff.local", "LocalStore", None),
    "s3": ("baton.handoff.s3", "S3Store", "boto3"),
    "hf": ("baton.handoff.hub", "HubStore", "huggingface_hub"),
}


def open_store(uri: str, *, retry: Optional[RetryPolicy] = None) -> Store:
    """A store from its URI: a folder path, file://, s3://bucket/prefix or hf://owner/repo.
    `retry` replaces the backend's default retry policy (the local folder never retries)."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme not in REGISTRY:
        known = ", ".join(f"{s}://" for s in REGISTRY)
        raise StoreConfigError(f"unknown store {uri!r}: use a folder path or one of {known}")
    module, cls, package = REGISTRY[scheme]
    try:
        backend = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        hint = f"; install it with `pip install {package}`" if package else ""
        raise StoreConfigError(f"the {scheme}:// store needs {package or module}{hint}") from exc
    return backend(uri) if retry is None else backend(uri, retry=retry)


__all__ = [
    "ABSENT", "Expect", "Store", "Versioned", "open_store", "check_key", "REGISTRY",
    "ConflictError", "NotFoundError",
]

