"""Stores, the lease with fencing, and checkpoint commit and verified pull."""

from .errors import (
    ConflictError,
    CorruptCheckpointError,
    FencedError,
    NotFoundError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
)
from .store import ABSENT, Store, Versioned, open_store

__all__ = [
    "ABSENT", "Store", "Versioned", "open_store", "ConflictError", "CorruptCheckpointError",
    "FencedError", "NotFoundError", "StoreConfigError", "StoreError", "StoreUnavailableError",
]
