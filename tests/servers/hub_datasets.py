"""Dataset repos for the Hub double (tests/servers/hub_double.py mounts them).

The real `huggingface_hub` client reads them as it reads the Hub's, with the Hub's semantics:

- `GET /api/datasets/{repo}[/revision/{rev}]`: repo info (`sha` of the commit, `private`,
  `gated`, `siblings`);
- `GET /api/datasets/{repo}/refs`: branches and the `refs/convert/parquet` conversion;
- `GET /api/datasets/{repo}/tree/{rev}[/{path}]?recursive=`: the listing, LFS entries with
  their sha256;
- `HEAD|GET /datasets/{repo}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit` and the
  ETag (the git blob id, or for LFS files `X-Linked-Etag`, the sha256, and `X-Linked-Size`).

Revisions are branch names (`main`, `refs/convert/parquet`, URL-encoded by the client) or
commit shas. Access: a public repo answers anyone; a private one answers 401 RepoNotFound
without the token; a gated one lists its files to anyone but serves them only to a token
that was granted access (401 GatedRepo without a token, 403 GatedRepo with one that was
not), as the Hub does before a user accepts the dataset's terms.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import unquote

LFS_SUFFIXES = (".parquet", ".arrow", ".gz", ".zip")


class DatasetError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class DatasetRepo:
    private: bool = False
    gated: bool = False
    granted: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch (or refs/convert/parquet) -> sha

    def commit_at(self, rev: str) -> tuple[str, dict[str, bytes]]:
        sha = self.refs.get(rev, rev)
        if sha not in self.commits:
            raise DatasetError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha, self.commits[sha]


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class DatasetRepos:
    """The dataset repos of one Hub double; tests add commits and change access here."""

    def __init__(self, token: str):
        self.token = token
        self.lock = threading.RLock()
        self.repos: dict[str, DatasetRepo] = {}

    def put(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
            private: bool = False, gated: bool = False) -> str:
        """Commit `files` (the whole tree) on `branch` of `repo_id`, made if absent; the sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, DatasetRepo(private=private, gated=gated))
            sha = hashlib.sha1(f"{repo_id}-{len(repo.commits)}-{os.urandom(8).hex()}".encode()
                               ).hexdigest()
            repo.commits[sha] = dict(files)
            repo.refs[branch] = sha
            return sha

    def forget(self, repo_id: str, sha: str) -> None:
        """Drop one commit, as a force-push that rewrote the history would."""
        with self.lock:
            del self.repos[repo_id].commits[sha]

    def route(self, handler, method: str) -> None:
        """Answer one request for a dataset path (the raw path: revisions hold %2F)."""
        raw = handler.path.split("?", 1)[0]
        query = handler.path.split("?", 1)[1] if "?" in handler.path else ""
        try:
            status, body, headers = self._answer(method, raw, query,
                                                 handler.headers.get("Authorization", ""))
        except DatasetError as err:
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            status, body = err.status, json.dumps({"error": err.message}).encode()
        handler._send(status, body, headers, method == "HEAD")

    def _answer(self, method: str, raw: str, query: str, auth: str):
        parts = raw.strip("/").split("/")
        api = parts[0] == "api"
        repo_id = unquote("/".join(parts[2:4] if api else parts[1:3]))
        rest = [unquote(p) for p in (parts[4:] if api else parts[3:])]
        with self.lock:
            repo = self._readable(repo_id, auth)
            if not api and rest[:1] == ["resolve"]:
                return self._resolve(repo, repo_id, rest[1], "/".join(rest[2:]), auth)
            if api and not rest:
                return self._info(repo, repo_id, "main")
            if api and rest[0] == "revision":
                return self._info(repo, repo_id, rest[1])
            if api and rest[0] == "refs":
                return self._refs(repo)
            if api and rest[0] == "tree":
                return self._tree(repo, rest[1], "/".join(rest[2:]), "recursive=true" in
                                  query.lower())
        raise DatasetError(404, f"no route for {method} {raw}")

    def _readable(self, repo_id: str, auth: str) -> DatasetRepo:
        if auth and auth != f"Bearer {self.token}":
            raise DatasetError(401, "Invalid credentials in Authorization header")
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not auth):
            raise DatasetError(401 if not auth else 404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _json(obj, headers: Optional[dict] = None):
        return 200, json.dumps(obj).encode(), {"Content-Type": "application/json",
                                                **(headers or {})}

    def _info(self, repo: DatasetRepo, repo_id: str, rev: str):
        sha, files = repo.commit_at(rev)
        return self._json({"id": repo_id, "sha": sha, "private": repo.private,
                           "gated": "manual" if repo.gated else False, "disabled": False,
                           "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _refs(self, repo: DatasetRepo):
        def ref(name: str, full: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": repo.refs[name]}

        branches = [ref(b, f"refs/heads/{b}") for b in repo.refs if not b.startswith("refs/")]
        converts = [ref(b, b) for b in repo.refs if b.startswith("refs/convert/")]
        return self._json({"branches": branches, "converts": converts, "tags": []})

    def _tree(self, repo: DatasetRepo, rev: str, under: str, recursive: bool):
        _, files = repo.commit_at(rev)
        prefix = under.rstrip("/") + "/" if under else ""
        entries, dirs = [], set()
        for path in sorted(p for p in files if p.startswith(prefix)):
            rest = path[len(prefix):].split("/")
            dirs.update(prefix + "/".join(rest[:i]) for i in range(1, len(rest) if recursive
                                                                   else min(2, len(rest))))
            if len(rest) == 1 or recursive:
                entries.append(self._entry(path, files[path]))
        entries += [{"type": "directory", "path": d, "oid": git_oid(d.encode()), "size": 0}
                    for d in sorted(dirs)]
        if under and not entries:
            raise DatasetError(404, f"{under} does not exist on {rev}", "EntryNotFound")
        return self._json(entries)

    @staticmethod
    def _entry(path: str, data: bytes) -> dict:
        item = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
        if path.endswith(LFS_SUFFIXES):
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                           "pointerSize": 134}
        return item

    def _resolve(self, repo: DatasetRepo, repo_id: str, rev: str, path: str, auth: str):
        if repo.gated and not (auth and repo.granted):
            raise DatasetError(403 if auth else 401, f"Access to dataset {repo_id} is "
                               "restricted. You must have access to it and be authenticated "
                               "to access it. Please log in.", "GatedRepo")
        sha, files = repo.commit_at(rev)
        if path not in files:
            raise DatasetError(404, "Entry not found", "EntryNotFound")
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_oid(data)}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if path.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                            "X-Linked-Size": str(len(data))})
        return 200, data, headers
