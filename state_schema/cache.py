"""The manifest of a run's encoded-data cache (session/datacache.py, training/encoded.py)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from .records import utcnow
from .versioning import Stored


class EncodedManifest(Stored):
    """`<run>/cache/encoded-<key>.json`: which file holds the encoded data for `key`, and
    the sha256 and size it must have; written after the file, create-if-absent."""

    key: str  # training.encoded.cache_key: data section, task, tokenizer files, encoding
    file: str  # the store key of the safetensors file (its name holds its sha256)
    sha256: str
    size: int
    created_at: datetime = Field(default_factory=utcnow)
