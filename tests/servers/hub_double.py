"""A local HTTP double of the Hugging Face Hub endpoints that `handoff.hub.HubStore` drives.

The real `huggingface_hub` client talks to it over HTTP, so the tests exercise the client's own
request building, NDJSON commits, LFS batch uploads and `hf_hub_download`. It implements, with the
Hub's documented semantics:

- `POST /api/repos/create` (409 when the repo exists, 403 outside the token's namespace);
- `GET /api/models/{repo}[/revision/{rev}]` (repo info with the commit sha);
- `POST /api/models/{repo}/preupload/{rev}` ("regular" or "lfs" per file, with the remote oid);
- `POST /{repo}.git/info/lfs/objects/batch`, then PUT and verify of the "basic" LFS transfer;
- `POST /api/models/{repo}/commit/{rev}` (NDJSON; 412 when `parentCommit` is not the head);
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=` (paginated with a `Link` header);
- `HEAD|GET /{repo}/resolve/{rev}/{path}` (ETag, X-Repo-Commit, X-Linked-Etag/-Size for LFS);
- dataset repos (`/api/datasets/...`, `/datasets/.../resolve/...`): tests/servers/hub_datasets.py.

LFS content is served inline from `resolve` rather than through a redirect to a CDN host, and
Xet storage is not offered: the fixture disables the client's Xet path (`HF_HUB_DISABLE_XET`), so
large files take the LFS "basic" transfer. State lives in memory behind one lock, so the test
process and the agents it starts see one truth.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.servers.http_body import read_body
from tests.servers.hub_datasets import DatasetRepos

TOKEN = "hf_double_fake_token_0123456789"
USER = "test-user"
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS
LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".npy", ".parquet", ".zip", ".gz")
PAGE_SIZE = 1000  # entries per tree page, as the Hub


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    size: int
    oid: str  # git blob oid (of the pointer file for LFS entries)
    lfs: Optional[str] = None  # sha256 of the content for LFS entries


@dataclass
class Commit:
    sha: str
    files: dict[str, Entry]


@dataclass
class Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)  # git oid or sha256 -> content

    @property
    def head(self) -> Commit:
        return self.commits[-1]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 extra: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubState:
    """The repos and their histories; every method takes the lock."""

    def __init__(self):
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.commit_counts: dict[str, int] = {}
        self._shas = itertools.count(1)
        self._injections: dict[str, list[dict[str, bytes]]] = {}
        # (fragment of 'METHOD /path', status, after): each answers one request with `status`,
        # before handling it, or after handling it (a response lost in flight) when `after`.
        self.faults: list[tuple[str, int, bool]] = []
        self.datasets = DatasetRepos(TOKEN)  # dataset repos: tests/servers/hub_datasets.py

    def new_sha(self) -> str:
        return hashlib.sha1(f"commit-{next(self._shas)}-{os.urandom(8).hex()}".encode()).hexdigest()

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def create(self, repo_id: str, private: bool, url: str) -> None:
        with self.lock:
            if repo_id.split("/")[0] != USER:
                raise HubError(403, f"You don't have the rights to create a model under the "
                                    f"namespace \"{repo_id.split('/')[0]}\"")
            if repo_id in self.repos:
                # The Hub names the existing repo; huggingface_hub reads "url" on exist_ok.
                raise HubError(409, "You already created this model repo", extra={"url": url})
            repo = Repo(private=private)
            attrs = b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
            repo.blobs[git_oid(attrs)] = attrs
            repo.commits.append(Commit(self.new_sha(), {".gitattributes": Entry(
                len(attrs), git_oid(attrs))}))
            self.repos[repo_id] = repo

    def commit_at(self, repo: Repo, rev: str) -> Commit:
        if rev == "main":
            return repo.head
        for c in repo.commits:
            if c.sha == rev:
                return c
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def apply(self, repo_id: str, ops: list[dict], parent: Optional[str]) -> str:
        """Apply one commit's operations atomically; 412 if `parent` is not the head."""
        with self.lock:
            repo = self.repo(repo_id)
            for files in self._injections.pop(repo_id, []):
                self._commit(repo_id, repo, [_add_op(p, d) for p, d in files.items()])
            if parent is not None and parent != repo.head.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            return self._commit(repo_id, repo, ops)

    def _commit(self, repo_id: str, repo: Repo, ops: list[dict]) -> str:
        files = dict(repo.head.files)
        for op in ops:
            _apply_op(repo, files, op)
        sha = self.new_sha()
        repo.commits.append(Commit(sha, files))
        self.commit_counts[repo_id] = self.commit_counts.get(repo_id, 0) + 1
        return sha

    def inject_before_next_commit(self, repo_id: str, files: dict[str, bytes]) -> None:
        with self.lock:
            self._injections.setdefault(repo_id, []).append(files)

    def take_fault(self, request: str) -> Optional[tuple[str, int, bool]]:
        with self.lock:
            for i, fault in enumerate(self.faults):
                if fault[0] in request:
                    return self.faults.pop(i)
        return None


def _add_op(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "encoding": "base64",
                                     "content": base64.b64encode(data).decode()}}


def _apply_op(repo: Repo, files: dict[str, Entry], op: dict) -> None:
    key, value = op.get("key"), op.get("value", {})
    path = value.get("path", "")
    if key == "file":
        data = base64.b64decode(value["content"])
        repo.blobs[git_oid(data)] = data
        files[path] = Entry(len(data), git_oid(data))
    elif key == "lfsFile":
        sha = value["oid"]
        if sha not in repo.blobs:
            raise HubError(400, f"LFS object {sha} was not uploaded")
        size = len(repo.blobs[sha])
        files[path] = Entry(size, git_oid(lfs_pointer(sha, size)), sha)
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
    elif key == "deletedFolder":
        under = [p for p in files if p.startswith(path.rstrip("/") + "/")]
        if not under:
            raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
        for p in under:
            del files[p]
    else:
        raise HubError(400, f"unknown commit operation {key!r}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    state: HubState  # set on the subclass the server builds

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
              head_only: bool = False) -> None:
        if getattr(self, "muted", False):
            return  # the request was handled but its answer is lost (an injected fault)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **(headers or {})})

    def _error(self, err: HubError, head_only: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        body = json.dumps({"error": err.message, **err.extra}).encode()
        self._send(err.status, body, headers, head_only)

    def _authorize(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            raise HubError(401, "Repository not found", "RepoNotFound")
        if auth != f"Bearer {TOKEN}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = read_body(self) if method in ("POST", "PUT") else b""
        head_only = method == "HEAD"
        fault = self.state.take_fault(f"{method} {path}")
        try:
            if fault and not fault[2]:
                raise HubError(fault[1], f"injected fault {fault[1]}")
            self.muted = bool(fault)
            try:
                self._route(method, path, query, body)
            finally:
                self.muted = False
            if fault:
                raise HubError(fault[1], f"injected fault {fault[1]} after handling")
        except HubError as err:
            self._error(err, head_only)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- routes ------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        parts = path.strip("/").split("/")
        if method == "PUT" and parts[0] == "_lfs":  # a pre-signed upload URL: no token
            return self._lfs_put("/".join(parts[1:3]), parts[3], body)
        if parts[0] == "datasets" or parts[:2] == ["api", "datasets"]:
            return self.state.datasets.route(self, method)  # public ones answer anyone
        self._authorize()
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if parts[0] == "_lfs" and parts[-1] == "verify":
            return self._lfs_verify("/".join(parts[1:3]), parts[3])
        if parts[0] == "api" and parts[1] == "models":
            return self._api(method, "/".join(parts[2:4]), parts[4:], query, body)
        if len(parts) >= 2 and parts[1].endswith(".git"):
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]),
                                 method == "HEAD")
        raise HubError(404, f"no route for {method} {path}")

    def _api(self, method: str, repo_id: str, rest: list[str], query: dict, body: bytes):
        with self.state.lock:
            repo = self.state.repo(repo_id)
            if not rest or rest[0] == "revision":
                commit = self.state.commit_at(repo, rest[1] if rest else "main")
                info = {"id": repo_id, "sha": commit.sha, "private": repo.private,
                        "siblings": [{"rfilename": p} for p in commit.files]}
                if "expand" in query:  # the Hub answers the id and the fields asked for
                    info = {k: v for k, v in info.items() if k == "id" or k in query["expand"]}
                return self._json(200, info)
            commit = self.state.commit_at(repo, rest[1])
            files = dict(commit.files)
        if rest[0] == "preupload":
            return self._preupload(files, json.loads(body))
        if rest[0] == "tree":
            return self._tree(repo_id, rest[1], files, "/".join(rest[2:]), query)
        if rest[0] == "commit" and method == "POST":
            return self._commit(repo_id, body)
        raise HubError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _validate_yaml(self, payload: dict) -> None:
        """The client checks a root README.md's metadata before committing it: 400 with the
        errors for YAML that does not parse or fields of the wrong type, as the Hub."""
        errors = card_metadata_errors(payload.get("content", ""))
        self._json(400 if errors else 200,
                   {"errors": [{"message": e} for e in errors], "warnings": []})

    def _create(self, payload: dict) -> None:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility", "private" if payload.get("private") else "public")
        url = f"{self.server.endpoint}/{repo_id}"
        self.state.create(repo_id, private == "private", url)
        self._json(200, {"url": url, "name": repo_id})

    def _preupload(self, files: dict[str, Entry], payload: dict) -> None:
        out = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (f["size"] >= LFS_THRESHOLD or f["path"].endswith(LFS_SUFFIXES)
                   or b"\0" in sample)
            entry = files.get(f["path"])
            remote = (entry.lfs or entry.oid) if entry else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": remote})
        self._json(200, {"files": out})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        with self.state.lock:
            have = set(self.state.repo(repo_id).blobs)
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in have:
                base = f"{self.server.endpoint}/_lfs/{repo_id}/{obj['oid']}"
                item["actions"] = {"upload": {"href": base}, "verify": {"href": base + "/verify"}}
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, repo_id: str, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        with self.state.lock:
            self.state.repo(repo_id).blobs[oid] = body
        self._send(200, headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, repo_id: str, oid: str) -> None:
        with self.state.lock:
            present = oid in self.state.repo(repo_id).blobs
        if not present:
            raise HubError(404, f"LFS object {oid} not found")
        self._json(200, {"success": True})

    def _commit(self, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), {})
        ops = [x for x in lines if x.get("key") != "header"]
        sha = self.state.apply(repo_id, ops, header.get("parentCommit"))
        self._json(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                         "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{sha}"})

    def _tree(self, repo_id: str, rev: str, files: dict[str, Entry], under: str, query: dict):
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = under.rstrip("/") + "/" if under else ""
        entries = _tree_entries(files, prefix, recursive)
        if under and not entries:
            raise HubError(404, f"{under} does not exist on {rev}", "EntryNotFound")
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + PAGE_SIZE]
        headers = {}
        if start + PAGE_SIZE < len(entries):
            nxt = (f"{self.server.endpoint}/api/models/{repo_id}/tree/{rev}/{under}"
                   f"?recursive={str(recursive).lower()}&cursor={start + PAGE_SIZE}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(200, page, headers)

    def _resolve(self, repo_id: str, rev: str, path: str, head_only: bool) -> None:
        with self.state.lock:
            repo = self.state.repo(repo_id)
            commit = self.state.commit_at(repo, rev)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            data = repo.blobs[entry.lfs or entry.oid]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.lfs or entry.oid}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size)})
        self._send(200, data, headers, head_only)


def card_metadata_errors(content: str) -> list[str]:
    import yaml

    if not content.startswith("---\n"):
        return []  # no metadata block: the Hub only warns
    block = content[4:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    errors = [f'"{k}" must be a string' for k in ("library_name", "license")
              if k in meta and not isinstance(meta[k], str)]
    for key in ("tags", "base_model"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    return errors


def _tree_entries(files: dict[str, Entry], prefix: str, recursive: bool) -> list[dict]:
    out, dirs = [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest:
            parts = rest.split("/")
            depth = range(1, len(parts)) if recursive else range(1, 2)
            dirs.update(prefix + "/".join(parts[:i]) for i in depth)
            if not recursive:
                continue
        e = files[path]
        item = {"type": "file", "path": path, "size": e.size, "oid": e.oid}
        if e.lfs:
            item["lfs"] = {"oid": e.lfs, "size": e.size,
                           "pointerSize": len(lfs_pointer(e.lfs, e.size))}
        out.append(item)
    out += [{"type": "directory", "path": d, "oid": git_oid(d.encode()), "size": 0}
            for d in sorted(dirs)]
    return out


class HubDouble:
    """The running server; what tests use to name repos, count commits and inject races."""

    def __init__(self):
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.endpoint = self.endpoint
        self.token = TOKEN
        self.datasets = self.state.datasets
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._names = itertools.count(1)

    def start(self) -> "HubDouble":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def new_repo_uri(self) -> str:
        return f"hf://{USER}/baton-test-{os.getpid()}-{next(self._names)}"

    def commits(self, repo_id: str) -> int:
        """Commits made to `repo_id` since it was created."""
        with self.state.lock:
            return self.state.commit_counts.get(repo_id, 0)

    def files(self, repo_id: str) -> dict[str, bytes]:
        """Path -> content at the head of `repo_id`."""
        with self.state.lock:
            repo = self.state.repo(repo_id)
            return {p: repo.blobs[e.lfs or e.oid] for p, e in repo.head.files.items()}

    def is_lfs(self, repo_id: str, path: str) -> bool:
        with self.state.lock:
            return self.state.repo(repo_id).head.files[path].lfs is not None

    def inject_before_next_commit(self, repo_id: str, files: dict[str, bytes]) -> None:
        """Land a commit of `files` just before the next commit request: a lost race."""
        self.state.inject_before_next_commit(repo_id, files)

    def fail_next(self, fragment: str, status: int = 503, times: int = 1,
                  after: bool = False) -> None:
        """Answer the next `times` requests whose 'METHOD /path' contains `fragment` with
        `status`; with `after`, handle each first, so only its answer is lost."""
        with self.state.lock:
            self.state.faults.extend([(fragment, status, after)] * times)


@pytest.fixture(scope="session")
def hub_server():
    """The Hub double, with HF_ENDPOINT and HF_TOKEN in the environment for subprocesses."""
    import huggingface_hub.constants as hf_constants

    server = HubDouble().start()
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET")}
    os.environ.update(HF_ENDPOINT=server.endpoint, HF_TOKEN=server.token, HF_HUB_DISABLE_XET="1")
    saved_xet, hf_constants.HF_HUB_DISABLE_XET = hf_constants.HF_HUB_DISABLE_XET, True
    try:
        yield server
    finally:
        hf_constants.HF_HUB_DISABLE_XET = saved_xet
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
