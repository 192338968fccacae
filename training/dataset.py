"""The run's train and eval samples, checked against the spec's fingerprints and encoded.

Without a cache and without packing a sample is one record, encoded when first used; with
packing the records are encoded once and cut into blocks of max_seq_len, and a sample is a
block. With a cache (training/encoded.py; the session passes one kept in the run's store) every
record is encoded once per run: the first session encodes and keeps the file, later sessions
load it and never read or tokenize the records at all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from baton.state_schema import RunSpec
from baton.state_schema.fields import task_of

from .columns import load_records
from .data import DataError, check_fingerprint
from .encode import Encoded, Encoder, pack
from .encoded import (EncodedCache, EncodedFileError, EncodedSet, cache_key, read_encoded,
                      tokenizer_fingerprint, tokenizer_folder, write_encoded)
from .order import eval_subset, split_eval

log = logging.getLogger("baton.data")


class RunData:
    def __init__(self, spec: RunSpec, data_path: Path, eval_path: Optional[Path] = None, *,
                 cache: Optional[EncodedCache] = None):
        self.spec = spec
        self.data_path = Path(data_path)
        self.eval_path = Path(eval_path) if eval_path else None
        self.cache = cache
        check_fingerprint(self.data_path, spec.data.sha256)
        if isinstance(spec.data.eval, str):
            if self.eval_path is None:
                raise DataError(f"the run evaluates on the file {spec.data.eval!r}; pass "
                                "eval_path (the agent downloads it from the store)")
            if spec.data.eval_sha256:
                check_fingerprint(self.eval_path, spec.data.eval_sha256, what="eval data")
        self._split: Optional[tuple[list, list]] = None
        if cache is None:  # a wrong file fails in a second, before the model loads
            self._read()
        self.encoder: Optional[Encoder] = None
        self.encoded_file: Optional[tuple[str, Path]] = None  # (key, local path) when cached
        self._cache: dict[int, Encoded] = {}
        self._packed: Optional[list[Encoded]] = None
        self._eval: Optional[list[Encoded]] = None
        self._sets: Optional[tuple[EncodedSet, EncodedSet]] = None  # (train, eval), cached

    def _read(self) -> tuple[list, list]:
        """(train records, eval records), read once; the spec pinned the files by sha256 and
        checked their format when the run was created, so a cached run may skip this."""
        if self._split is None:
            records = self._load(self.data_path)
            if self.eval_path is not None and isinstance(self.spec.data.eval, str):
                self._split = (records, self._load(self.eval_path))
            else:
                train, held = split_eval(len(records), self.spec.data.eval, self.spec.train.seed)
                self._split = ([records[i] for i in train], [records[i] for i in held])
        return self._split

    def _load(self, path: Path) -> list:
        """The file's records as the run's fields, through the spec's column mapping."""
        data = self.spec.data
        return load_records(path, data.columns, data.format, task_of(self.spec))

    @property
    def train_records(self) -> list:
        return self._read()[0]

    @property
    def eval_records(self) -> list:
        return self._read()[1]

    def attach(self, tokenizer, cache: Optional[EncodedCache] = None) -> None:
        """Give the data its tokenizer; packing encodes everything now, so n_train is known.
        A cache (here or at construction) encodes every record once per run instead."""
        self.encoder = Encoder(tokenizer, self.spec.data.format, self.spec.data.max_seq_len)
        cache = cache or self.cache
        key = None
        if cache is not None:
            fingerprint = tokenizer_fingerprint(tokenizer_folder(self.spec))
            key = cache_key(self.spec, fingerprint) if fingerprint else None
            if key is None:
                log.info("no tokenizer files found for %s: encoding without the cache",
                         self.spec.model.name)
        if key is not None:
            self._sets = self._cached_sets(cache, key)
        elif self.spec.data.packing:
            encoded = [self.encoder(r) for r in self.train_records]
            self._packed = pack(encoded, self.spec.data.max_seq_len)

    def _cached_sets(self, cache: EncodedCache, key: str) -> tuple[EncodedSet, EncodedSet]:
        sets = None
        path = cache.fetch(key)
        if path is not None:
            try:
                sets = read_encoded(path, key)
            except EncodedFileError as exc:  # verified bytes, wrong content: never trusted
                log.warning("%s; encoding the data again", exc)
        if sets is None:
            path = cache.local_path(key)
            sets = self._encode_all(path, key)
            cache.keep(key, path)
        self.encoded_file = (key, path)
        return self._split_sets(sets)

    def _encode_all(self, path: Path, key: str) -> dict[str, EncodedSet]:
        """Every record of the train file (file order, before the split) and of the eval
        file, encoded once and written to `path`."""
        started = time.perf_counter()
        records = self._load(self.data_path)
        sets = {"train": EncodedSet.from_encoded([self.encoder(r) for r in records])}
        if self.eval_path is not None and isinstance(self.spec.data.eval, str):
            held = self._load(self.eval_path)
            sets["eval"] = EncodedSet.from_encoded([self.encoder(r) for r in held])
        write_encoded(path, key, sets)
        log.info("encoded %d records (%d tokens) in %.1f s, once for the run", len(records),
                 sets["train"].tokens, time.perf_counter() - started)
        return sets

    def _split_sets(self, sets: dict[str, EncodedSet]) -> tuple[EncodedSet, EncodedSet]:
        """The train and eval samples as the uncached path makes them: the seeded split (or
        the eval file), then packing when the spec asks."""
        every = sets["train"]
        if "eval" in sets:
            train, held = every, sets["eval"]
        else:
            train_ix, held_ix = split_eval(len(every), self.spec.data.eval, self.spec.train.seed)
            train, held = every.select(train_ix), every.select(held_ix)
        # The fixed subset every eval measures, as eval_used picks it from the records.
        held = held.select(eval_subset(len(held), self.spec.eval_records, self.spec.train.seed))
        if self.spec.data.packing:
            train = train.pack(self.spec.data.max_seq_len)
            held = held.pack(self.spec.data.max_seq_len) if len(held) else held
        return train, held

    @property
    def n_train(self) -> int:
        if self._sets is not None:
            return len(self._sets[0])
        if self.spec.data.packing:
            if self._packed is None:
                raise RuntimeError("RunData.attach(tokenizer) must come before n_train")
            return len(self._packed)
        return len(self.train_records)

    def sample(self, index: int) -> Encoded:
        if self._sets is not None:
            return self._sets[0][index]
        if self._packed is not None:
            return self._packed[index]
        if self.encoder is None:
            raise RuntimeError("RunData.attach(tokenizer) must come before sample()")
        if index not in self._cache:
            self._cache[index] = self.encoder(self.train_records[index])
        return self._cache[index]

    @property
    def eval_used(self) -> list[dict]:
        """The held-out records every eval measures: at most the spec's eval_records of them,
        a fixed subset drawn from the seed."""
        chosen = eval_subset(len(self.eval_records), self.spec.eval_records,
                             self.spec.train.seed)
        return [self.eval_records[i] for i in chosen]

    def eval_samples(self) -> list[Encoded]:
        if self._eval is None and self._sets is not None:
            self._eval = self._sets[1].as_list()
        if self._eval is None:
            encoded = [self.encoder(r) for r in self.eval_used]
            packing = self.spec.data.packing and encoded
            self._eval = pack(encoded, self.spec.data.max_seq_len) if packing else encoded
        return self._eval
