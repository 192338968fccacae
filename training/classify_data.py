"""Classification data: (text[, text_pair]) -> label records, the label set, their encoding.

A classification run reads records with the fields `text`, `label` and, for pair
classification, `text_pair` (the `data.columns` mapping names them in the file). The label set
is the sorted set of labels in the training split, read once when the run is created and kept
in the spec: a label's id is its index there, so every session, eval.py and the merged model
agree on what each output of the head means. Labels are kept as strings (a CSV has no other
kind); when every label is an integer they sort as numbers, so "10" comes after "9".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from baton.state_schema import RunSpec

from .data import DataError
from .dataset import RunData
from .order import split_eval

TEXT, PAIR, LABEL = "text", "text_pair", "label"


@dataclass
class Labelled:
    """One encoded classification sample: its tokens and the id of its label."""

    input_ids: list[int]
    label: int

    @property
    def label_tokens(self) -> int:
        """The loss is one cross-entropy a sample: the engine's per-step normaliser counts
        samples where a causal LM counts tokens."""
        return 1


def label_text(value: Any) -> str:
    """A record's label as the spec keeps it: True/1/'1' from JSON or CSV all read alike."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _sort_key(label: str):
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)


def sorted_labels(labels: Iterable[str]) -> list[str]:
    found = set(labels)
    if all(_sort_key(x)[0] == 0 for x in found):
        return sorted(found, key=int)
    return sorted(found)


def check_records(records: list[dict[str, Any]], source: str) -> None:
    """Every record has a non-empty text and a label; DataError names the first that has not."""
    for number, record in enumerate(records, 1):
        missing = [k for k in (TEXT, LABEL) if record.get(k) is None or
                   (isinstance(record.get(k), str) and not record[k].strip())]
        if missing:
            raise DataError(
                f"{source} record {number} has no {' or '.join(missing)} (columns "
                f"{sorted(record)}); task: classification needs a 'text' and a 'label' in every "
                "record (and 'text_pair' for pairs): map them with data.columns or fix the file")


def train_split(records: list[dict[str, Any]], eval_fraction, seed: int):
    """(training records, held-out records) by the engine's own seeded split."""
    fraction = eval_fraction if isinstance(eval_fraction, float) else None
    train, held = split_eval(len(records), fraction, seed)
    return [records[i] for i in train], [records[i] for i in held]


def check_eval_labels(labels: list[str], records: list[dict[str, Any]], source: str) -> None:
    known = set(labels)
    unseen = sorted({label_text(r[LABEL]) for r in records} - known, key=_sort_key)
    if unseen:
        raise DataError(
            f"{source} has label(s) {unseen[:5]} that the training split never shows (it has "
            f"{labels[:10]}{' ...' if len(labels) > 10 else ''}); a classifier cannot learn a "
            "class it never sees: add training records with those labels, or drop them from "
            "the eval data")


def run_labels(train_records: list[dict[str, Any]], eval_fraction, seed: int,
               eval_records: Optional[list[dict[str, Any]]] = None, *,
               source: str = "the training data", eval_source: str = "the eval file") -> list[str]:
    """The run's label set from its training split; DataError for a record without text or
    label, fewer than two classes, or an eval record whose label training never shows."""
    check_records(train_records, source)
    train, held = train_split(train_records, eval_fraction, seed)
    labels = sorted_labels(label_text(r[LABEL]) for r in train)
    if len(labels) < 2:
        raise DataError(f"{source} has only the label {labels}; a classifier needs at least "
                        "two classes")
    if eval_records is not None:
        check_records(eval_records, eval_source)
        check_eval_labels(labels, eval_records, eval_source)
    else:
        check_eval_labels(labels, held, f"the held-out split of {source} (data.eval "
                                        f"{eval_fraction})")
    return labels


class LabelEncoder:
    """A record -> Labelled: the tokenizer's own special tokens (CLS/SEP for an encoder, BOS
    for a decoder that adds one), the pair joined as the tokenizer joins pairs, cut to
    max_seq_len."""

    def __init__(self, tokenizer, labels: list[str], max_seq_len: int):
        self.tok = tokenizer
        self.ids = {label: i for i, label in enumerate(labels)}
        self.max_seq_len = max_seq_len

    def __call__(self, record: dict[str, Any]) -> Labelled:
        pair = record.get(PAIR)
        enc = self.tok(str(record[TEXT]), None if pair is None else str(pair),
                       truncation=True, max_length=self.max_seq_len)
        label = label_text(record[LABEL])
        if label not in self.ids:
            raise DataError(f"label {label!r} is not one of the run's labels {list(self.ids)}")
        if not enc["input_ids"]:
            raise DataError(f"the text {str(record[TEXT])[:60]!r} encodes to no tokens")
        return Labelled(list(enc["input_ids"]), self.ids[label])


class LabelledData(RunData):
    """The run's train and eval records as Labelled samples, checked against spec.labels."""

    def __init__(self, spec: RunSpec, data_path: Path, eval_path: Optional[Path] = None):
        super().__init__(spec, data_path, eval_path)
        if spec.data.packing:
            raise DataError("task: classification pools one sample at a time; set "
                            "data.packing: false")
        if not spec.labels:
            raise DataError("the run's spec has no label set; it was not created as a "
                            "classification run")
        check_records(self.train_records, str(data_path))
        check_records(self.eval_records, str(eval_path or data_path))
        check_eval_labels(spec.labels, self.train_records, str(data_path))
        check_eval_labels(spec.labels, self.eval_records, str(eval_path or data_path))

    def attach(self, tokenizer) -> None:
        self.encoder = LabelEncoder(tokenizer, self.spec.labels, self.spec.data.max_seq_len)

    def majority(self) -> tuple[int, float]:
        """(id of the training split's most common label, its share of the eval records):
        the accuracy a classifier gets by always answering it."""
        counts = [0] * len(self.spec.labels)
        for record in self.train_records:
            counts[self.encoder.ids[label_text(record[LABEL])]] += 1
        top = max(range(len(counts)), key=lambda i: (counts[i], -i))
        held = [self.encoder.ids[label_text(r[LABEL])] for r in self.eval_records]
        return top, (sum(1 for x in held if x == top) / len(held) if held else 0.0)
