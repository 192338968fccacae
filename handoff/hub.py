"""A store in a Hugging Face Hub model repo: `hf://namespace/repo[/sub/prefix]`.

The Hub versions the whole repo, one git commit at a time, and its only precondition is
`create_commit(..., parent_commit=<sha>)`: a 412 when the repo moved since that sha. Baton needs
conditions on single keys, so a conditional write reads the repo's head sha, checks the key's
content at that sha, and commits with `parent_commit=head`. On a 412 it starts over at the new
head: if the key still satisfies the condition (an unrelated file moved, such as a session
record) the commit is retried; if the key itself changed the writer gets `ConflictError`.

Version tokens are the sha256 of an object's content, as in the local store, so a token stays
valid across commits that touch other files.

The Hub allows about 128 commits an hour to one repo. Every write, upload and delete here is one
commit, so the lease code must keep heartbeats sparse on this backend (minutes apart), and a
checkpoint goes up as a single commit through `publish`.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import (
    ConflictError,
    NotFoundError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
)
from .retry import RETRYABLE_STATUS, RetryPolicy
from .secrets import scrub
from .store import ABSENT, Expect, Store, Versioned, check_key

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PRECONDITION_FAILED = 412
MOVES = 8  # fresh looks at a moving repo before giving up


def _token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Job:
    """One conditional commit, across its attempts."""

    path: str
    data: bytes
    expect: Expect
    operations: Callable[[], list]
    message: str
    alone: bool
    ambiguous: bool = False  # a commit request failed in flight: it may have landed

    def holds(self, current: Optional[bytes]) -> bool:
        return _holds(current, self.expect)


class _Moved(Exception):
    """The repo's head moved between our read and our commit (HTTP 412): look again."""


def _status(exc: BaseException) -> Optional[int]:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _chain(exc: BaseException):
    """The exception and its causes: huggingface_hub wraps network faults (a failed metadata
    request becomes LocalEntryNotFoundError, a failed LFS upload a RuntimeError)."""
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def is_transient(exc: BaseException) -> bool:
    """Connection faults, timeouts, 5xx and 429 are worth another try; 4xx answers are not."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    for link in _chain(exc):
        if isinstance(link, OfflineModeIsEnabled):
            return False  # a ConnectionError by class, but waiting will not bring the network
        if isinstance(link, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
        status = _status(link)
        if status is not None:
            return status in RETRYABLE_STATUS
    return False


def parse_uri(uri: str) -> tuple[str, str]:
    """`hf://namespace/repo[/sub/prefix]` -> ('namespace/repo', 'sub/prefix/' or '')."""
    parts = uri[len("hf://"):].strip("/").split("/") if uri.startswith("hf://") else []
    if len(parts) < 2 or not all(NAME.match(p) for p in parts[:2]):
        raise StoreConfigError(
            f"invalid Hub store {uri!r}: write hf://namespace/repo (a model repo, e.g. "
            f"hf://me/my-run), optionally followed by /a/folder inside the repo")
    sub = "/".join(parts[2:])
    if sub:
        check_key(sub)
    return f"{parts[0]}/{parts[1]}", f"{sub}/" if sub else ""


class HubStore(Store):
    # The Hub takes about 128 commits an hour a repo and a renewal is a commit: a longer lease
    # lets the heartbeat (a third of it) beat every 10 minutes.
    lease_ttl = 1800.0
    shows_page = True  # README.md is the repo's page on the Hub

    def __init__(self, uri: str, *, retry: Optional[RetryPolicy] = None):
        from huggingface_hub import HfApi

        self.uri = uri
        if retry is not None:
            self.retry = retry
        self.repo_id, self.base = parse_uri(uri)
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None,
                         token=os.environ.get("HF_TOKEN") or None)
        self.endpoint = self.api.endpoint

    # -- errors --------------------------------------------------------------------------------
    def _secrets(self) -> list[str]:
        from huggingface_hub import get_token

        found = [os.environ.get("HF_TOKEN"), self.api.token, get_token()]
        return [s for s in found if isinstance(s, str) and len(s) >= 4]

    def _scrub(self, text: str) -> str:
        return scrub(text, extra=self._secrets())[:500]

    def _raise(self, err: StoreError, cause: BaseException):
        """Raise `err`, chaining `cause` only when its text cannot carry the token."""
        leaked = self._scrub(str(cause)) != str(cause)[:500]
        raise err from (None if leaked else cause)

    def _translate(self, exc: BaseException, what: str):
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        if any(isinstance(link, OfflineModeIsEnabled) for link in _chain(exc)):
            self._raise(StoreConfigError(
                f"cannot {what} in {self.uri}: HF_HUB_OFFLINE is set; unset it to use a Hub "
                f"store, or name a local folder as the store"), exc)
        # The HTTP answer may sit under a wrapper (a failed LFS upload is a RuntimeError).
        http = next((link for link in _chain(exc) if _status(link) is not None), None)
        status = _status(http) if http is not None else None
        if status in (401, 403):
            namespace = self.repo_id.split("/")[0]
            self._raise(StoreConfigError(
                f"the Hub at {self.endpoint} refused to {what} in {self.repo_id} (HTTP {status}): "
                f"set HF_TOKEN to a token with write access to the namespace '{namespace}' "
                f"(https://huggingface.co/settings/tokens), or name a repo in your own namespace"),
                exc)
        if is_transient(exc) or isinstance(exc, (LocalEntryNotFoundError, ConnectionError)):
            self._raise(StoreUnavailableError(
                f"the Hub at {self.endpoint} could not {what} in {self.repo_id} after retries "
                f"({type(exc).__name__}: {self._scrub(str(exc))}); check the network or "
                f"HF_ENDPOINT and run again"), exc)
        if http is not None:
            self._raise(StoreError(f"the Hub at {self.endpoint} could not {what} in "
                                   f"{self.repo_id} (HTTP {status}): {self._scrub(str(http))}"),
                        exc)
        raise exc

    def _call(self, what: str, fn: Callable):
        """Run `fn` under the shared retry policy; translate what is left into store errors."""
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

        try:
            return self.retry.retrying(is_transient)(fn)
        except (StoreError, ValueError):
            raise
        except (RepositoryNotFoundError, RemoteEntryNotFoundError) as exc:
            raise NotFoundError(f"could not {what}: not found in {self.uri} (or HF_TOKEN "
                                f"cannot read it)") from exc
        except _Moved as exc:
            raise StoreUnavailableError(
                f"{self.repo_id} on {self.endpoint} kept moving under concurrent commits; could "
                f"not {what}. Run again, and make sure one run writes to one repo") from exc
        except Exception as exc:  # noqa: BLE001 - sorted and re-raised by _translate
            self._translate(exc, what)

    # -- primitives ----------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return self.base + check_key(key)

    def _head(self) -> Optional[str]:
        """The sha of `main`, or None where the repo does not exist (yet)."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            # expand=sha: the answer stays small however many files the repo holds
            return self.api.model_info(self.repo_id, revision="main", expand=["sha"]).sha
        except RepositoryNotFoundError:
            return None

    def _create_repo(self) -> str:
        self.api.create_repo(self.repo_id, private=True, exist_ok=True)
        head = self._head()
        if head is None:
            raise StoreConfigError(
                f"created {self.repo_id} on {self.endpoint} but cannot read it back: check that "
                f"HF_TOKEN can read private repos of '{self.repo_id.split('/')[0]}'")
        return head

    def _fetch(self, path: str, revision: str) -> Optional[bytes]:
        """The bytes of `path` at `revision`; None if the file or the repo is absent."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, path, revision=revision, endpoint=self.endpoint)
        response = get_session().get(url, headers=build_hf_headers(token=self.api.token))
        try:
            hf_raise_for_status(response)
        except (RemoteEntryNotFoundError, RepositoryNotFoundError):
            return None
        return response.content

    def _commit(self, operations: list, message: str, parent: Optional[str]) -> bool:
        """One commit; False if the client skipped it because nothing changed at `main`."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            self.api.create_commit(self.repo_id, operations, commit_message=message,
                                   parent_commit=parent)
        except HfHubHTTPError as exc:
            if _status(exc) == PRECONDITION_FAILED:
                raise _Moved() from exc
            raise
        # huggingface_hub drops additions whose content is already at `main` and then makes no
        # commit at all, so no parent check happened either: the caller must look again.
        from huggingface_hub import CommitOperationAdd

        return all(getattr(op, "_is_committed", True) for op in operations
                   if isinstance(op, CommitOperationAdd))

    # -- the interface -------------------------------------------------------------------------
    def read(self, key: str) -> Versioned:
        path = self._path(key)
        data = self._call(f"read {path}", lambda: self._fetch(path, "main"))
        if data is None:
            raise NotFoundError(f"{key} not found in {self.uri} (or HF_TOKEN cannot read it)")
        return Versioned(data, _token(data))

    def write(self, key: str, data: bytes, *, expect: Expect = None) -> str:
        path = self._path(key)
        self._conditional_commit(
            path, data, expect, lambda: [_add(path, data)], f"baton: write {path}")
        return _token(data)

    def publish(self, files: dict[str, Path], key: str, data: bytes, *, expect: Expect) -> str:
        """The checkpoint's files and the new pointer in ONE commit: never one without the
        other, and one commit of the hourly budget."""
        path = self._path(key)
        staged = {self._path(k): Path(p) for k, p in files.items()}

        def operations():
            return [_add(name, str(p)) for name, p in staged.items()] + [_add(path, data)]

        self._conditional_commit(path, data, expect, operations,
                                 f"baton: publish {len(staged)} files and {path}",
                                 alone=not staged)
        return _token(data)

    def _conditional_commit(self, path: str, data: bytes, expect: Expect,
                            operations: Callable[[], list], message: str,
                            alone: bool = True) -> None:
        """Commit `operations` if `path` satisfies `expect` at the head they are based on.
        `alone`: the key is the commit's only change, so finding `data` there already makes
        the commit a no-op."""
        job = _Job(path, data, expect, operations, message, alone)
        self._call(f"write {path}", lambda: _until_settled(lambda: self._attempt(job)))

    def _attempt(self, job: "_Job") -> None:
        head = self._head() or self._create_or_conflict(job.path, job.expect)
        # (An upload passes no data: after a lost answer it is simply committed again.)
        if job.expect is not None or (job.ambiguous and job.data):
            current = self._fetch(job.path, head)
            if current == job.data and (job.ambiguous or (job.alone and job.holds(current))):
                return  # already there: our lost commit landed, or a no-op write at head
            if not job.holds(current):
                raise ConflictError(_conflict_message(job.path, job.expect, self.uri))
        try:
            committed = self._commit(job.operations(), job.message,
                                     head if job.expect is not None else None)
        except Exception as exc:
            job.ambiguous = job.ambiguous or is_transient(exc)  # it may have landed
            raise
        if not committed and job.expect is not None:
            raise _Moved()

    def _create_or_conflict(self, path: str, expect: Expect) -> str:
        if expect is not None and expect is not ABSENT:
            raise ConflictError(_conflict_message(path, expect, self.uri))
        return self._create_repo()

    def upload(self, key: str, path: Path) -> None:
        name = self._path(key)
        local = Path(path)
        if not local.is_file():
            raise FileNotFoundError(f"cannot upload {local}: no such file")
        self._conditional_commit(name, b"", None, lambda: [_add(name, str(local))],
                                 f"baton: upload {name}")

    def download(self, key: str, path: Path) -> None:
        from huggingface_hub import hf_hub_download

        name, path = self._path(key), Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A private local_dir per call: nothing shared with the user's HF cache, and the final
        # file appears only by rename, whole.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            def fetch() -> str:
                return hf_hub_download(self.repo_id, name, revision="main", local_dir=tmp,
                                       endpoint=self.endpoint, token=self.api.token)
            os.replace(self._call(f"download {name}", fetch), path)

    def list(self, prefix: str) -> list[str]:
        folder = (self.base + prefix).rstrip("/")

        def listing() -> list[str]:
            head = self._head()
            return [] if head is None else self._tree(folder, head)

        return sorted(k for k in self._call(f"list {folder or '/'}", listing)
                      if not (k == ".gitattributes" and not self.base))

    def _tree(self, folder: str, head: str) -> list[str]:
        from huggingface_hub.errors import RemoteEntryNotFoundError
        from huggingface_hub.hf_api import RepoFile

        try:
            entries = list(self.api.list_repo_tree(self.repo_id, path_in_repo=folder or None,
                                                   recursive=True, revision=head))
        except RemoteEntryNotFoundError:
            return []
        files = [e.path for e in entries if isinstance(e, RepoFile)]
        return [p[len(self.base):] for p in files if p.startswith(self.base)]

    def delete(self, key: str) -> None:
        self._delete(self._path(key), is_folder=False)

    def delete_prefix(self, prefix: str) -> None:
        """One commit removes the whole folder (a checkpoint), not one commit per file."""
        folder = (self.base + prefix).rstrip("/")
        if not folder:
            raise ValueError("refusing to delete the whole store: name a folder")
        check_key(folder)
        self._delete(folder, is_folder=True)

    def _delete(self, path: str, is_folder: bool) -> None:
        from huggingface_hub import CommitOperationDelete
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

        def attempt() -> None:
            op = CommitOperationDelete(path_in_repo=path + ("/" if is_folder else ""),
                                       is_folder=is_folder)
            try:
                self._commit([op], f"baton: delete {path}", None)
            except (RemoteEntryNotFoundError, RepositoryNotFoundError):
                return  # absent already: deleting is idempotent

        self._call(f"delete {path}", attempt)


def _until_settled(attempt: Callable[[], None]) -> None:
    """A 412 is no fault: look again at once (with a little jitter against lockstep with
    another writer) rather than through the slower fault backoff."""
    for _ in range(MOVES):
        try:
            return attempt()
        except _Moved:
            time.sleep(random.uniform(0.0, 0.1))
    raise _Moved()


def _add(path: str, content):
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=content)


def _holds(current: Optional[bytes], expect: Expect) -> bool:
    if expect is None:
        return True
    if expect is ABSENT:
        return current is None
    return current is not None and _token(current) == expect


def _conflict_message(path: str, expect: Expect, uri: str) -> str:
    if expect is ABSENT:
        return f"{path} already exists in {uri}"
    return f"{path} in {uri} changed since it was read"
