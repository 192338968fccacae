"""Checkpoint commit (files, manifest last, then HEAD) and verified pull with fallback.

Commit order is what makes a cut upload harmless: the files go first, `manifest.json` (sha256 and
size of each) after them, and HEAD moves last by a conditional write that carries the writer's
lease generation. A checkpoint HEAD names is therefore always complete; one that is not
complete is never named. On the Hub, `Store.publish` puts files and HEAD in one commit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from baton.state_schema import FileEntry, Head, Manifest, SchemaError, utcnow

from .errors import ConflictError, CorruptCheckpointError, FencedError, NotFoundError, StoreError
from .runstore import RunStore, parse_checkpoint_id
from .store import ABSENT, Expect, check_key

log = logging.getLogger("baton.checkpoint")

MANIFEST = "manifest.json"
HEAD_ATTEMPTS = 20  # conflicts with our own generation are rare; this only bounds a livelock


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint pulled and verified into `path`."""

    id: str
    step: int
    path: Path
    fell_back: bool = False  # HEAD's checkpoint was bad and an older one is used
    previous_bad: Optional[str] = None  # the id HEAD named when fell_back
    generation: int = 0


def checkpoint_id(step: int, generation: int) -> str:
    if step < 0 or generation < 0:
        raise ValueError(f"step ({step}) and generation ({generation}) must not be negative")
    return f"{step:08d}-g{generation}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- commit ------------------------------------------------------------------------------

def commit_checkpoint(runstore: RunStore, local_dir: Path, *, step: int, generation: int,
                      finished: bool = False, keep: int = 3,
                      extra: Optional[dict[str, Path]] = None) -> str:
    """Upload `local_dir` as checkpoint `<step>-g<generation>`, move HEAD to it, prune old ones.

    `extra` (store key -> local file): more files for the same change, outside the checkpoint
    and its manifest, such as the run's page on the Hub, which so costs no commit of its own.
    FencedError (nothing moved) when HEAD carries a higher generation than ours."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    cid = checkpoint_id(step, generation)
    extra = {check_key(k): Path(p) for k, p in (extra or {}).items()}
    head, version = _read_head(runstore)
    _check_fence(runstore, head, generation, cid)
    if head.checkpoint == cid:
        # Same step, same writer: HEAD already names these files; re-uploading over them would
        # put HEAD's own checkpoint at risk, so only the `finished` flag may change.
        head = _mark_finished(runstore, head, version, finished, cid, extra)
    else:
        files = _local_files(Path(local_dir))
        with tempfile.TemporaryDirectory(prefix="baton-manifest-") as staging:
            manifest = _write_manifest(Path(staging), files, cid, step, generation)
            uploads = {runstore.checkpoint_key(cid, n): p for n, p in files.items()}
            uploads.update(extra)
            uploads[runstore.checkpoint_key(cid, MANIFEST)] = manifest  # last, by dict order
            head = _move_head(runstore, uploads, cid, step, generation, finished)
    _retain(runstore, keep, protected={head.checkpoint, head.previous})
    return cid


def _read_head(runstore: RunStore) -> tuple[Head, Expect]:
    got = runstore.read_head()
    return got if got else (Head(), ABSENT)


def _check_fence(runstore: RunStore, head: Head, generation: int, cid: str) -> None:
    if head.generation > generation:
        raise FencedError(
            f"checkpoint {cid} of run {runstore.run!r} not committed: HEAD carries lease "
            f"generation {head.generation}, above this agent's {generation}, so another agent "
            "took the run over; this session must stop (its uncommitted steps are discarded)")


def _local_files(local_dir: Path) -> dict[str, Path]:
    if not local_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {local_dir} does not exist; save first")
    files = {p.relative_to(local_dir).as_posix(): p
             for p in sorted(local_dir.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)  # ours is written fresh; a stale one must not be uploaded
    if not files:
        raise FileNotFoundError(f"checkpoint folder {local_dir} is empty; nothing to commit")
    for name in files:
        check_key(name)
    return files


def _write_manifest(staging: Path, files: dict[str, Path], cid: str, step: int,
                    generation: int) -> Path:
    entries = {n: FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
               for n, p in files.items()}
    manifest = Manifest(checkpoint=cid, step=step, generation=generation, files=entries)
    path = staging / MANIFEST
    path.write_bytes(manifest.to_json())
    return path


def _move_head(runstore: RunStore, uploads: dict[str, Path], cid: str, step: int,
               generation: int, finished: bool) -> Head:
    """Publish the files and the new HEAD; re-read and retry on a conflict while HEAD's
    generation is not above ours. Every read is checked for fencing before it is used as a
    condition: a successor may have stamped HEAD while our files were uploading."""
    head, version = _read_head(runstore)
    for _ in range(HEAD_ATTEMPTS):
        if head.generation > generation:
            _discard(runstore, cid)
            _check_fence(runstore, head, generation, cid)
        new = Head(checkpoint=cid, previous=head.checkpoint, step=step, generation=generation,
                   finished=finished, updated_at=utcnow())
        try:
            runstore.store.publish(uploads, runstore.key("HEAD.json"), new.to_json(),
                                   expect=version)
            return new
        except ConflictError:
            head, version = _read_head(runstore)
        if cid in (head.checkpoint, head.previous):
            # Our publish landed but its answer was lost and the retry refused (a successor
            # may even have stamped or committed on top since): committed, and never discarded.
            return head
        if runstore.read_manifest(cid) is not None:
            uploads = {}  # the files landed (a backend whose publish is not atomic)
    raise ConflictError(f"HEAD of run {runstore.run!r} kept moving under checkpoint {cid}; "
                        "is a second agent of the same generation running? Stop it and retry")


def _mark_finished(runstore: RunStore, head: Head, version: Expect, finished: bool,
                   cid: str, extra: dict[str, Path]) -> Head:
    if not finished or head.finished:
        return head
    new = head.model_copy(update={"finished": True, "updated_at": utcnow()})
    try:
        # The extra files ride along in the same change (one commit on the Hub); with none,
        # publish is a plain conditional write of HEAD.
        runstore.store.publish(extra, runstore.key("HEAD.json"), new.to_json(), expect=version)
    except ConflictError:
        head, _ = _read_head(runstore)
        if head.checkpoint == cid and head.finished:
            return head  # landed; only its answer was lost
        _check_fence(runstore, head, new.generation, cid)
        raise
    return new


def _discard(runstore: RunStore, cid: str) -> None:
    """Best effort: remove the files of a checkpoint that can never be named by HEAD."""
    try:
        runstore.store.delete_prefix(runstore.checkpoint_key(cid))
    except StoreError as exc:
        log.warning("could not remove fenced checkpoint %s: %s", cid, exc)


def _retain(runstore: RunStore, keep: int, protected: set[Optional[str]]) -> None:
    """Delete checkpoints beyond the newest `keep`, never those HEAD names. A failure here
    costs only space, so it is logged, not raised: the commit has already succeeded."""
    try:
        ids = runstore.list_checkpoints()
        for cid in ids[:max(0, len(ids) - keep)]:
            if cid not in protected:
                log.info("retention: deleting checkpoint %s of run %r", cid, runstore.run)
                runstore.store.delete_prefix(runstore.checkpoint_key(cid))
    except StoreError as exc:
        log.warning("retention of run %r failed (%s); old checkpoints stay", runstore.run, exc)


# -- pull --------------------------------------------------------------------------------

class _Unusable(Exception):
    """A checkpoint that cannot be used: incomplete, missing a file, or altered."""


def pull_checkpoint(runstore: RunStore, dest: Path) -> Optional[CheckpointRef]:
    """Download HEAD's checkpoint into `dest` (replaced) and verify every file.

    Falls back to HEAD.previous, then older checkpoints with a complete manifest, with a
    warning; None if the run has no checkpoint; CorruptCheckpointError if none verifies.
    Transient store errors propagate: an outage is not evidence of corruption."""
    got = runstore.read_head()
    if got is None or got[0].checkpoint is None:
        return None
    head = got[0]
    dest = Path(dest)
    failures = []
    for cid in _candidates(runstore, head):
        try:
            manifest = _fetch_verified(runstore, cid, dest)
        except _Unusable as exc:
            log.warning("checkpoint %s of run %r is unusable (%s); falling back to the one "
                        "before it", cid, runstore.run, exc)
            failures.append(f"{cid}: {exc}")
            continue
        fell_back = cid != head.checkpoint
        return CheckpointRef(id=cid, step=manifest.step, path=dest, fell_back=fell_back,
                             previous_bad=head.checkpoint if fell_back else None,
                             generation=manifest.generation)
    raise CorruptCheckpointError(
        f"no checkpoint of run {runstore.run!r} in {runstore.store.uri} verifies: "
        + "; ".join(failures) + ". Restore the files from a copy, or start a new run")


def pull_chosen(runstore: RunStore, cid: Optional[str], dest: Path) -> Optional[CheckpointRef]:
    """For readers that judge or merge one checkpoint (eval.py, merge.py): the named one,
    verified, or HEAD's with pull's fallback; None before the run's first commit."""
    return pull_checkpoint(runstore, dest) if cid is None else pull_named(runstore, cid, dest)


def pull_named(runstore: RunStore, cid: str, dest: Path) -> CheckpointRef:
    """Download one named checkpoint into `dest` (replaced) and verify every file; no
    fallback, since the person asked for this one. CorruptCheckpointError says why not."""
    try:
        manifest = _fetch_verified(runstore, cid, Path(dest))
    except _Unusable as exc:
        known = ", ".join(runstore.list_checkpoints()) or "none"
        raise CorruptCheckpointError(
            f"checkpoint {cid!r} of run {runstore.run!r} cannot be used: {exc}; "
            f"checkpoints in the store: {known}") from exc
    return CheckpointRef(id=cid, step=manifest.step, path=Path(dest),
                         generation=manifest.generation)


def _candidates(runstore: RunStore, head: Head) -> list[str]:
    """HEAD's checkpoint, HEAD.previous, then older listed ones, newest first. Checkpoints
    newer than HEAD's were never committed (cut or fenced uploads) and are never used."""
    newest = parse_checkpoint_id(head.checkpoint)
    older = [c for c in runstore.list_checkpoints() if parse_checkpoint_id(c) < newest]
    ordered = [head.checkpoint, head.previous, *reversed(older)]
    return list(dict.fromkeys(c for c in ordered if c))


def _fetch_verified(runstore: RunStore, cid: str, dest: Path):
    manifest = _manifest_of(runstore, cid)
    staging = dest.parent / f".{dest.name}.pull-{cid}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, entry in manifest.files.items():
            _download_verified(runstore, cid, name, entry, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return manifest


def _manifest_of(runstore: RunStore, cid: str) -> Manifest:
    try:
        manifest = runstore.read_manifest(cid)
    except SchemaError as exc:
        raise _Unusable(f"its manifest is unreadable: {exc}") from exc
    if manifest is None:
        raise _Unusable("it has no manifest: its upload never finished")
    if manifest.checkpoint != cid:
        raise _Unusable(f"its manifest describes {manifest.checkpoint}")
    return manifest


def _download_verified(runstore: RunStore, cid: str, name: str, entry: FileEntry,
                       staging: Path) -> None:
    try:
        check_key(name)
    except ValueError as exc:
        raise _Unusable(f"its manifest names an unsafe path {name!r}") from exc
    local = staging / name
    try:
        runstore.store.download(runstore.checkpoint_key(cid, name), local)
    except NotFoundError as exc:
        raise _Unusable(f"{name} is missing from the store") from exc
    size = local.stat().st_size
    if size != entry.size:
        raise _Unusable(f"{name} has {size} bytes, its manifest says {entry.size}")
    if sha256_file(local) != entry.sha256:
        raise _Unusable(f"{name} does not match its sha256 in the manifest (altered)")
