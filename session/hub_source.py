"""A run whose data is a Hub dataset (`data.train: hf://datasets/OWNER/NAME[@REVISION]`).

When the run is created the revision is pinned to a commit and the subset's split files are
chosen (`training.hub_data.pin`), downloaded, mapped through `data.columns` and checked
record by record, so bad data is refused before anything is written. The spec keeps the
commit, the file list and the fingerprint of exactly those files; every later session
downloads the same files at the same commit and checks them against it.

The files are not copied into the run's store (local data is): a Hub commit is immutable
and content-addressed, so the commit already is the copy, and a dataset is often far larger
than the adapter the store exists for (one copy a run, against the store's quota: a Hub
store's repo, a free S3 tier). The price is that the dataset must stay readable: a commit
deleted, a repo made private or gated is a clear exit 2 naming the commit, never other data.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from baton.state_schema import DataSpec, HubDataSpec, RunConfig, RunSpec
from baton.state_schema.fields import task_of
from baton.training.columns import load_records, resolve_columns
from baton.training.data import SUFFIXES, DataChangedError, DataError, fingerprint, read_records
from baton.training.hub_data import Pinned, as_source, fetch, pin


@dataclass
class HubFound:
    """What creating a run read from its Hub dataset."""

    sha256: str
    format: str
    columns: dict[str, str]
    hub: HubDataSpec
    eval_sha256: Optional[str] = None
    records: list[dict[str, Any]] = field(default_factory=list)  # the train split, mapped


def eval_split(config: RunConfig) -> Optional[str]:
    """data.eval as a split of the dataset: a string that does not name a data file."""
    value = config.data.eval
    if isinstance(value, str) and Path(value).suffix.lower() not in SUFFIXES:
        return value
    return None


def inspect_hub(config: RunConfig) -> HubFound:
    """Pin, download and check the train (and eval) split. DataError for what the config or
    the token must fix; DatasetUnavailableError when the Hub does not answer."""
    data, task = config.data, task_of(config)
    repo, revision = data.hub
    pinned = pin(repo, revision, data.subset)
    train_files, held = pinned.files(data.split), eval_split(config)
    if held == data.split:
        raise DataError(f"data.eval names the training split {held!r}; name another split "
                        f"of the dataset ({', '.join(sorted(pinned.splits))}) or a fraction")
    eval_files = pinned.files(held) if held else []  # a missing split fails before downloads
    with tempfile.TemporaryDirectory(prefix="baton-hub-") as tmp:
        train = _local(pinned, train_files, Path(tmp) / "train")
        sha = fingerprint(train)
        fmt, columns = resolve_columns(read_records(train)[0], data.columns, data.format, task,
                                       source=_name(pinned, data.split))
        records = load_records(train, columns, fmt, task)
        eval_sha = None
        if eval_files:
            evaluation = _local(pinned, eval_files, Path(tmp) / "eval")
            eval_sha = fingerprint(evaluation)
            load_records(evaluation, columns, fmt, task)
    hub = HubDataSpec(repo=repo, revision=pinned.revision, ref=pinned.ref, subset=pinned.subset,
                      split=data.split, files=train_files, eval_split=held,
                      eval_files=eval_files)
    return HubFound(sha, fmt, columns, hub, eval_sha, records)


def _local(pinned: Pinned, files: list[str], folder: Path) -> Path:
    return as_source(fetch(pinned.repo, pinned.revision, files), folder)


def _name(pinned: Pinned, split: str) -> str:
    """The source as messages name it: the dataset, subset, split and commit."""
    subset = f" subset {pinned.subset!r}" if pinned.subset else ""
    return f"dataset {pinned.repo!r}{subset} split {split!r} (commit {pinned.revision[:12]})"


def hub_data_fields(found: HubFound) -> dict[str, Any]:
    """The spec's data fields that a Hub dataset sets (the rest are the config's)."""
    hub = found.hub
    return {"key": f"hf://datasets/{hub.repo}@{hub.revision}", "sha256": found.sha256,
            "format": found.format, "columns": found.columns, "hub": hub,
            "eval_sha256": found.eval_sha256}


def hub_inputs(data: DataSpec, workdir: Path) -> tuple[Path, Optional[Path]]:
    """The train (and eval split) files of the run's commit, downloaded into the HF cache
    and checked against the spec's fingerprints."""
    hub = data.hub
    base = workdir / "data" / "hub" / hub.revision[:12]
    train = as_source(fetch(hub.repo, hub.revision, hub.files, pinned=True),
                      base / "train")
    _check(train, data.sha256, hub, hub.split)
    evaluation = None
    if hub.eval_files and data.eval_sha256:
        evaluation = as_source(fetch(hub.repo, hub.revision, hub.eval_files, pinned=True),
                               base / "eval")
        _check(evaluation, data.eval_sha256, hub, hub.eval_split)
    return train, evaluation


def _check(source: Path, expected: str, hub: HubDataSpec, split: Optional[str]) -> None:
    found = fingerprint(source)
    if found != expected:
        raise DataChangedError(
            f"split {split!r} of dataset {hub.repo!r} at commit {hub.revision[:12]} now reads "
            f"as sha256 {found[:12]}…, not {expected[:12]}… as when the run was created; Baton "
            "will not train the run on other data: start a new run name for the data as it is")


def hub_differences(spec: RunSpec, config: RunConfig) -> list[str]:
    """How the config's Hub dataset differs from the run's, as spec_differences words it."""
    ours, theirs = config.data, spec.data.hub
    if (ours.hub is None) != (theirs is None):
        run_reads = f"dataset {theirs.repo!r}" if theirs else f"the file {spec.data.source!r}"
        return [f"data.train: the run reads {run_reads}, the config says {ours.train!r}"]
    if theirs is None:
        return []
    repo, revision = ours.hub
    pairs = [("data.train", theirs.repo, repo), ("data.split", theirs.split, ours.split)]
    if ours.subset is not None:
        pairs.append(("data.subset", theirs.subset, ours.subset))
    if revision and len(revision) == 40 and revision != theirs.revision:
        pairs.append(("data.train revision", theirs.revision, revision))
    if eval_split(config) and theirs.eval_split:  # split names; a file's path varies by machine
        pairs.append(("data.eval", theirs.eval_split, eval_split(config)))
    return [f"{key}: the run has {run!r}, the config says {cfg!r}"
            for key, run, cfg in pairs if run != cfg]


def hub_samples(config: RunConfig) -> tuple[int, float]:
    """(samples, mean characters a sample) of the train split, read as a session reads it."""
    records = inspect_hub(config).records
    lengths = [sum(len(str(v)) for v in r.values()) for r in records]
    return len(lengths), sum(lengths) / len(lengths)
