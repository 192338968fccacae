"""The run's train and eval samples, checked against the spec's fingerprints and encoded.

Without packing a sample is one record, encoded when first used; with packing the records
are encoded once and cut into blocks of max_seq_len, and a sample is a block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from state_schema import RunSpec
from state_schema.fields import task_of

from .columns import load_records
from .data import DataError, check_fingerprint
from .encode import Encoded, Encoder, pack
from .order import eval_subset, split_eval


class RunData:
    def __init__(self, spec: RunSpec, data_path: Path, eval_path: Optional[Path] = None):
        self.spec = spec
        check_fingerprint(Path(data_path), spec.data.sha256)
        records = self._load(Path(data_path))
        self.train_records, self.eval_records = self._split(records, eval_path)
        self.encoder: Optional[Encoder] = None
        self._cache: dict[int, Encoded] = {}
        self._packed: Optional[list[Encoded]] = None
        self._eval: Optional[list[Encoded]] = None

    def _split(self, records, eval_path: Optional[Path]):
        spec = self.spec.data
        if isinstance(spec.eval, str):
            if eval_path is None:
                raise DataError(f"the run evaluates on the file {spec.eval!r}; pass eval_path "
                                "(the agent downloads it from the store)")
            if spec.eval_sha256:
                check_fingerprint(Path(eval_path), spec.eval_sha256, what="eval data")
            return records, self._load(Path(eval_path))
        train, held = split_eval(len(records), spec.eval, self.spec.train.seed)
        return [records[i] for i in train], [records[i] for i in held]

    def _load(self, path: Path) -> list:
        """The file's records as the run's fields, through the spec's column mapping."""
        data = self.spec.data
        return load_records(path, data.columns, data.format, task_of(self.spec))

    def attach(self, tokenizer) -> None:
        """Give the data its tokenizer; packing encodes everything now, so n_train is known."""
        self.encoder = Encoder(tokenizer, self.spec.data.format, self.spec.data.max_seq_len)
        if self.spec.data.packing:
            encoded = [self.encoder(r) for r in self.train_records]
            self._packed = pack(encoded, self.spec.data.max_seq_len)

    @property
    def n_train(self) -> int:
        if self.spec.data.packing:
            if self._packed is None:
                raise RuntimeError("RunData.attach(tokenizer) must come before n_train")
            return len(self._packed)
        return len(self.train_records)

    def sample(self, index: int) -> Encoded:
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
        if self._eval is None:
            encoded = [self.encoder(r) for r in self.eval_used]
            packing = self.spec.data.packing and encoded
            self._eval = pack(encoded, self.spec.data.max_seq_len) if packing else encoded
        return self._eval
