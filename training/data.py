"""Training data files: reading, format detection, fingerprint.

Three shapes of record are understood, in JSONL, CSV or Parquet (when pyarrow is installed):
  text   {"text": "..."}                                   loss on every token
  pairs  {"prompt": "...", "completion": "..."}            loss on the completion
  chat   {"messages": [{"role": ..., "content": ...}]}     loss on the assistant turns
The sha256 of the file's bytes pins the data in the run's spec: a later session that finds
other bytes refuses to continue rather than silently train on a different set. A source may
also be a folder of such files (a Hub dataset's split in several shards), read in name order
and pinned by the sha256 of its files' sha256s. Other names of fields are mapped to these
by `training/columns.py`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

FORMATS = ("text", "pairs", "chat")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """The data is missing, empty or not in a shape Baton can train on."""


class DataChangedError(DataError):
    """The data's bytes differ from those the run was started with."""


def fingerprint(path: Path) -> str:
    """sha256 hex of the file's bytes; of a folder, fingerprint_files of its data files."""
    path = _existing(path)
    if path.is_dir():
        return fingerprint_files(data_files(path))
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_files(paths: list[Path]) -> str:
    """The fingerprint of files read one after another: one file's is its own sha256 (so a
    one-file Hub split pins like a local file); several files', the sha256 of theirs, in order."""
    shas = [fingerprint(p) for p in paths]
    if len(shas) == 1:
        return shas[0]
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()


def data_files(folder: Path) -> list[Path]:
    """The data files of a folder, in name order (the order they are read in)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"folder {folder} holds no .jsonl, .json, .csv or .parquet file")
    return files


def check_fingerprint(path: Path, expected: str, *, what: str = "training data") -> None:
    found = fingerprint(path)
    if found != expected:
        raise DataChangedError(
            f"the {what} at {path} has sha256 {found[:12]}…, but this run was started with "
            f"{expected[:12]}…. Resume with the original file (it is kept in the store under "
            f"<run>/data/{expected}.*), or start a new run name for the new data"
        )


def _existing(path: Path) -> Path:
    path = Path(path)
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"data file {path} does not exist; check data.train / data.eval in run.yaml")
    return path


def _kind(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path} has suffix {path.suffix!r}; Baton reads .jsonl, .csv and .parquet files"
        )
    return kind


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    """A .json file holding one array of objects, as ShareGPT and alpaca exports often are."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path} should hold a JSON array of objects, or one object a line")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as fh:
            if fh.read(4096).lstrip().startswith("["):
                return _read_json_array(path)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} should be a JSON object, one per line")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        # Chat data in a CSV holds each conversation as a JSON string.
        if isinstance(row.get("messages"), str):
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: a 'messages' cell is not a JSON list ({exc})") from exc
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path} is Parquet; install pyarrow (pip install pyarrow) or convert "
                        "it to JSONL") from exc
    return pq.read_table(path).to_pylist()


@lru_cache(maxsize=8)
def _read_cached(path: str, kind: str, sha: str) -> tuple[dict[str, Any], ...]:
    # The kind comes from the name the caller gave: a Hub cache's file is a link to a blob
    # without a suffix.
    p = Path(path)
    rows = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind](p)
    if not rows:
        raise DataError(f"{p} holds no records; give a file with at least one sample")
    return tuple(rows)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the file (of a folder's files, in name order), in file order.
    DataError if missing, empty or unreadable."""
    path = _existing(path)
    if path.is_dir():
        return [row for p in data_files(path) for row in read_records(p)]
    return list(_read_cached(str(path), _kind(path), fingerprint(path)))


def format_of(record: dict[str, Any]) -> str | None:
    if isinstance(record.get("messages"), list):
        return "chat"
    if "prompt" in record and "completion" in record:
        return "pairs"
    if "text" in record:
        return "text"
    return None


def detect_format(path: Path) -> str:
    """"text" | "pairs" | "chat", from the first record; DataError if none fits."""
    first = read_records(path)[0]
    found = format_of(first)
    if found is None:
        raise DataError(
            f"{path}: cannot tell the format from columns {sorted(first)}; give a 'text' column, "
            "'prompt' and 'completion' columns, or a 'messages' list of {role, content}"
        )
    return found


def check_format(records: list[dict[str, Any]], fmt: str, *, source: Path) -> None:
    if fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not one of {FORMATS}")
    for number, record in enumerate(records, 1):
        if format_of(record) != fmt and not (fmt == "text" and "text" in record):
            raise DataError(
                f"{source} record {number} does not fit format {fmt!r} (columns "
                f"{sorted(record)}); fix the record or set data.format to match the file"
            )


def count_samples(path: Path) -> int:
    return len(read_records(path))
