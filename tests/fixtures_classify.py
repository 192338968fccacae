"""Fixtures of the classification tests: the tiny RoBERTa-shaped encoder and labelled records.

The encoder is built once per test session, as fixtures_tiny builds the tiny Llama; a module
imports the fixture to use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from tests.fixtures_tiny import make_spec

COLOURS = ("blue", "green", "red")


def colour_records(n: int = 36) -> list[dict]:
    """Short texts whose label is the colour word they hold: a tiny random model learns it in
    a few steps, so a test can see the head move."""
    nouns = ("car", "house", "bird", "shirt", "door", "lamp")
    return [{"text": f"the {COLOURS[i % 3]} {nouns[i % 6]} number {i}",
             "label": COLOURS[i % 3]} for i in range(n)]


def classification_spec(model_dir: Path, data_path: Path, *, load_in_4bit: bool = False,
                        labels: Optional[list[str]] = None, **kw):
    """make_spec's RunSpec as a classification run, its label set read as the agent reads it."""
    from baton.training.classify_data import run_labels
    from baton.training.data import read_records

    spec = make_spec(model_dir, data_path, fmt="text", **kw)
    found = labels or run_labels(read_records(data_path), spec.data.eval, spec.train.seed)
    model = spec.model.model_copy(update={"load_in_4bit": load_in_4bit})
    return spec.model_copy(update={"task": "classification", "labels": found, "model": model})


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    from baton.scripts.tiny_encoder import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder") / "roberta")
