"""Encoded samples as flat tensors: the form in which a run's data is tokenized once.

Tokenizing 20,000 chat records takes tens of seconds on a CPU (each conversation's template is
rendered once per assistant turn to find the spans that carry loss), and every session of a run
used to pay it again. The run's records are therefore encoded once, in file order, before the
eval split, and kept as one safetensors file: for each set (`train`, and `eval` when the eval
data is a file of its own) `<set>.ids` and `<set>.labels` (int32, every sample end to end) and
`<set>.offsets` (int64, sample i is `[offsets[i], offsets[i+1])`). The split and the packing are
redone from that file at load: both are index arithmetic on tensors, milliseconds for 20,000
records, and so the file holds nothing the seed decides.

The file is found by `cache_key`: the sha256 of the canonical JSON of the spec's whole data
section (the data's sha256, format, columns, eval, max_seq_len, packing, and what other fields
the section grows), the spec's `task` when it has one, the encoding's version and the
tokenizer's fingerprint (the sha256 of its files, never its name). Where the file is kept is
not the engine's business: a cache object (`session/datacache.py` keeps it in the run's store)
hands over verified local copies; the engine never imports `handoff`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch
from baton.state_schema import RunSpec

from .encode import IGNORE, Encoded

log = logging.getLogger("baton.data")

ENCODING = "baton-encoded/1"  # bump when the file's layout or the Encoder's output changes
# The files that decide how a tokenizer turns text into ids (whichever of them it has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


class EncodedFileError(ValueError):
    """An encoded-data file that does not hold what its key says: rebuild it."""


class EncodedCache(Protocol):
    """Where encoded files live between sessions (session/datacache.py: the run's store)."""

    def fetch(self, key: str) -> Optional[Path]:
        """A verified local copy of the file for `key`, or None (absent, or corrupt)."""

    def local_path(self, key: str) -> Path:
        """Where to write a newly encoded file for `key` on this machine."""

    def keep(self, key: str, path: Path) -> None:
        """Keep the file just built for `key` for later sessions (create-if-absent)."""


@dataclass
class EncodedSet:
    """Samples end to end: sample i is ids[offsets[i]:offsets[i+1]]."""

    ids: torch.Tensor  # int32 [tokens]
    labels: torch.Tensor  # int32 [tokens]
    offsets: torch.Tensor  # int64 [samples + 1]
    positions: Optional[torch.Tensor] = None  # int32 [tokens], packed blocks only

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def __getitem__(self, index: int) -> Encoded:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        positions = None if self.positions is None else self.positions[start:end].tolist()
        return Encoded(self.ids[start:end].tolist(), self.labels[start:end].tolist(), positions)

    def as_list(self) -> list[Encoded]:
        return [self[i] for i in range(len(self))]

    @classmethod
    def from_encoded(cls, samples: list[Encoded]) -> "EncodedSet":
        lengths = torch.tensor([0] + [len(s.input_ids) for s in samples], dtype=torch.int64)
        ids = [t for s in samples for t in s.input_ids]
        labels = [t for s in samples for t in s.labels]
        return cls(torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32),
                   torch.cumsum(lengths, 0))

    def select(self, indices: list[int]) -> "EncodedSet":
        """The samples at `indices`, in that order (the train or eval split)."""
        index = torch.tensor(indices, dtype=torch.int64)
        starts, lengths = self.offsets[index], self.offsets[index + 1] - self.offsets[index]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        gather = _ranges(starts, lengths, offsets)
        return EncodedSet(self.ids[gather], self.labels[gather], offsets)

    def pack(self, max_seq_len: int) -> "EncodedSet":
        """training.encode.pack on flat tensors, with the same blocks: whole samples, in
        order, a new block when the next sample does not fit; positions restart at each
        sample, whose first token carries no label."""
        lengths = (self.offsets[1:] - self.offsets[:-1]).tolist()
        block_starts, used = [], max_seq_len + 1
        for i, n in enumerate(lengths):
            if used + n > max_seq_len:
                block_starts.append(i)
                used = 0
            used += n
        sample_starts = self.offsets[:-1]
        labels = self.labels.clone()
        labels[sample_starts[torch.tensor(lengths) > 0]] = IGNORE
        positions = torch.arange(self.tokens, dtype=torch.int64) - torch.repeat_interleave(
            sample_starts, torch.tensor(lengths, dtype=torch.int64))
        offsets = torch.cat([self.offsets[torch.tensor(block_starts, dtype=torch.int64)],
                             self.offsets[-1:]])
        return EncodedSet(self.ids, labels, offsets, positions.to(torch.int32))


def _ranges(starts: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The concatenation of range(start, start + length) for each pair, without a loop."""
    total = int(offsets[-1])
    shift = torch.repeat_interleave(starts - offsets[:-1], lengths)
    return torch.arange(total, dtype=torch.int64) + shift


# -- the key -----------------------------------------------------------------------------------

def tokenizer_folder(spec: RunSpec) -> Optional[Path]:
    """The folder the run's tokenizer was loaded from: the model's local folder, or its
    snapshot in the Hugging Face cache (no network: the tokenizer was just loaded)."""
    local = Path(spec.model.name).expanduser()
    if local.is_dir():  # training.model.is_local's rule; importing it would close a cycle
        return local
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.model.name, "tokenizer_config.json",
                                   revision=spec.model.revision)
    return Path(found).parent if isinstance(found, str) else None


def tokenizer_fingerprint(folder: Optional[Path]) -> Optional[str]:
    """sha256 over the tokenizer's files (name and content hash of each one present); None
    when none is found, and then nothing is cached (a name alone could hide other files)."""
    if folder is None:
        return None
    entries = {}
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            entries[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    if not entries:
        return None
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def cache_key(spec: RunSpec, tokenizer_fp: str) -> str:
    """The encoded file's key: every input that changes the encoding, as canonical JSON."""
    doc = {"encoding": ENCODING, "tokenizer": tokenizer_fp,
           "data": spec.data.model_dump(mode="json")}
    task = getattr(spec, "task", None)  # a top-level task field, when the spec has one
    if task is not None:
        doc["task"] = task.model_dump(mode="json") if hasattr(task, "model_dump") else task
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- the file ----------------------------------------------------------------------------------

def write_encoded(path: Path, key: str, sets: dict[str, EncodedSet]) -> Path:
    """One safetensors file of the sets, written beside and then moved into place, so a reader
    never sees half of it. Deterministic bytes: the same input gives the same file."""
    from safetensors.torch import save_file

    tensors = {}
    for name, s in sets.items():
        tensors.update({f"{name}.ids": s.ids, f"{name}.labels": s.labels,
                        f"{name}.offsets": s.offsets})
    meta = {"encoding": ENCODING, "key": key, "sets": ",".join(sorted(sets))}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    os.replace(partial, path)
    return path


def read_encoded(path: Path, key: str) -> dict[str, EncodedSet]:
    """The sets of a file written by write_encoded for `key`; EncodedFileError otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise EncodedFileError(f"{path} is not a readable encoded-data file ({exc})") from exc
    if meta.get("encoding") != ENCODING or meta.get("key") != key:
        raise EncodedFileError(f"{path} holds encoding {meta.get('encoding')!r} for key "
                               f"{str(meta.get('key'))[:12]}…, not {ENCODING} for {key[:12]}…")
    sets = {}
    for name in filter(None, meta.get("sets", "").split(",")):
        s = EncodedSet(*(tensors.get(f"{name}.{part}") for part in ("ids", "labels", "offsets")))
        if any(t is None for t in (s.ids, s.labels, s.offsets)) or \
                int(s.offsets[-1]) != s.ids.numel() or s.labels.numel() != s.ids.numel():
            raise EncodedFileError(f"{path}: set {name!r} is inconsistent; rebuild it")
        sets[name] = s
    return sets


class SharedFile:
    """The cache of a rank other than 0: the file rank 0 fetched or built on this machine
    (one encoding a machine, not one a rank). It never writes where rank 0 reads."""

    def __init__(self, key: str, path: Path, rank: int):
        self.key, self.path, self.rank = key, Path(path), rank

    def fetch(self, key: str) -> Optional[Path]:
        return self.path if key == self.key and self.path.is_file() else None

    def local_path(self, key: str) -> Path:
        return self.path.with_name(f"{self.path.stem}.rank{self.rank}{self.path.suffix}")

    def keep(self, key: str, path: Path) -> None:
        """Rank 0 keeps the run's copy; a follower's own encoding stays local."""
