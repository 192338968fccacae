"""A local spool for the last checkpoint when the store cannot be reached at the deadline.

A session whose final commit fails because the store is down would otherwise lose every step
since its last committed checkpoint. Instead it keeps the checkpoint under
`<workdir>/spool/<run>/<step>-g<generation>/` with a `spool.json` (the store, the run, the
step, the generation and the sha256 of each file), and the next session that starts from the
same workdir and reaches the store commits it before pulling (`push_pending`).

Fencing. The spooled checkpoint was made under an older lease generation; the pushing session
holds a newer lease and has stamped its generation into HEAD, so only it may move HEAD now.
It commits the spooled files under its own generation, and only when HEAD's step is still
below the spooled step: every checkpoint of a run follows the same data order from the same
spec, so a checkpoint at step s is a valid state of the run at step s whatever session made
it, and replacing a HEAD at a lower step loses nothing that the spooled one does not hold.
When HEAD has reached or passed the spooled step, another session already did that work and
the spooled copy is dropped. The spool lives on this machine's disk: a VM that is gone takes
it along, which is why a spooled checkpoint is never reported as committed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import checkpoint_id, commit_checkpoint, sha256_file
from .errors import CorruptCheckpointError
from .runstore import RunStore, parse_checkpoint_id

log = logging.getLogger("baton.spool")

INFO = "spool.json"


@dataclass(frozen=True)
class Spooled:
    """A checkpoint kept on local disk, waiting for the store."""

    path: Path
    run: str
    store: Optional[str]
    step: int
    generation: int
    files: dict  # name -> sha256

    @property
    def id(self) -> str:
        return checkpoint_id(self.step, self.generation)


def spool_dir(workdir: Path, run: str) -> Path:
    return Path(workdir) / "spool" / run


def spool(local_ckpt_dir: Path, workdir: Path, run: str, step: int, generation: int,
          store: Optional[str] = None) -> Spooled:
    """Copy a saved checkpoint folder into the spool (atomically: a copy then a rename) and
    drop older spooled checkpoints of the run, which this one supersedes."""
    source = Path(local_ckpt_dir)
    files = {p.relative_to(source).as_posix(): sha256_file(p)
             for p in sorted(source.rglob("*")) if p.is_file() and p.name != INFO}
    if not files:
        raise FileNotFoundError(f"checkpoint folder {source} is empty; nothing to spool")
    folder = spool_dir(workdir, run)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".incoming-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, staging)
    info = {"run": run, "store": store, "step": step, "generation": generation, "files": files}
    (staging / INFO).write_text(json.dumps(info, indent=1))
    final = folder / checkpoint_id(step, generation)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for older in pending(workdir, run):
        if older.path != final:
            shutil.rmtree(older.path, ignore_errors=True)
    return _read(final)


def pending(workdir: Path, run: str) -> list[Spooled]:
    """Spooled checkpoints of `run`, oldest step first; folders without a readable
    spool.json (a copy cut short) are skipped."""
    folder = spool_dir(workdir, run)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not (path / INFO).is_file():
            continue
        try:
            found.append(_read(path))
        except (ValueError, KeyError) as exc:
            log.warning("ignoring unreadable spooled checkpoint %s: %s", path, exc)
    return sorted(found, key=lambda s: (s.step, s.generation))


def _read(path: Path) -> Spooled:
    info = json.loads((path / INFO).read_text())
    return Spooled(path=path, run=info["run"], store=info.get("store"), step=int(info["step"]),
                   generation=int(info["generation"]), files=dict(info["files"]))


def push_pending(runstore: RunStore, workdir: Path, generation: int, *,
                 keep: int = 3) -> list[str]:
    """Commit the newest spooled checkpoint of the run under `generation` (the lease this
    session holds) if HEAD is still behind it; return the ids committed (empty or one).

    Spooled copies that HEAD has caught up with are dropped. FencedError (from
    commit_checkpoint) if a newer generation owns the run: the spool is then kept."""
    spooled = [s for s in pending(workdir, runstore.run) if _same_store(s, runstore)]
    if not spooled:
        return []
    newest = spooled[-1]
    head_step = _head_step(runstore)
    if head_step is not None and head_step >= newest.step:
        log.info("spooled checkpoint %s of run %r is not ahead of HEAD (step %d); dropping it",
                 newest.id, runstore.run, head_step)
        _drop(spooled)
        return []
    if newest.generation > generation:
        raise CorruptCheckpointError(
            f"spooled checkpoint {newest.path} carries lease generation {newest.generation}, "
            f"above this session's {generation}: it does not belong to this store's run; "
            "move it out of the spool folder")
    _verify(newest)
    cid = commit_checkpoint(runstore, _payload(newest), step=newest.step,
                            generation=generation, keep=keep)
    log.warning("pushed spooled checkpoint %s of run %r as %s", newest.id, runstore.run, cid)
    _drop(spooled)
    return [cid]


def _same_store(spooled: Spooled, runstore: RunStore) -> bool:
    return spooled.store is None or spooled.store == runstore.store.uri


def _head_step(runstore: RunStore) -> Optional[int]:
    got = runstore.read_head()
    if got is None or got[0].checkpoint is None:
        return None
    return parse_checkpoint_id(got[0].checkpoint)[0]


def _verify(spooled: Spooled) -> None:
    """The local disk may have been filled or cut mid-copy: check before publishing."""
    for name, digest in spooled.files.items():
        path = spooled.path / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CorruptCheckpointError(
                f"spooled checkpoint {spooled.path}: {name} is missing or altered; delete the "
                "folder (the run continues from the store's HEAD)")


def _payload(spooled: Spooled) -> Path:
    """The folder to commit, without spool.json: commit_checkpoint uploads every file."""
    staging = spooled.path.parent / f".push-{spooled.id}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(spooled.path, staging, ignore=shutil.ignore_patterns(INFO))
    return staging


def _drop(spooled: list[Spooled]) -> None:
    for item in spooled:
        shutil.rmtree(item.path, ignore_errors=True)
        shutil.rmtree(item.path.parent / f".push-{item.id}", ignore_errors=True)


def describe(spooled: Spooled) -> str:
    """What the person is told when the final commit could only be spooled."""
    return (f"the store could not be reached, so checkpoint {spooled.id} (step {spooled.step}) "
            f"is kept on this machine in {spooled.path}; it is NOT committed yet. Run the same "
            "command from this machine with the same --workdir when the store answers again "
            "and it will be pushed first")
