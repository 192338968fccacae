"""Pydantic models of everything Baton stores, with schema versions and upgrades."""

from .cache import EncodedManifest
from .config import (
    CheckpointConfig,
    DataConfig,
    DataSpec,
    LoraConfig,
    ModelConfig,
    RunConfig,
    RunSpec,
    SessionConfig,
    TrainConfig,
    TrainSpec,
    check_run_name,
    parse_duration,
)
from .records import Cursor, FileEntry, Head, Lease, Manifest, SessionRecord, utcnow
from .versioning import (
    SCHEMA_VERSION,
    UPGRADES,
    NewerSchemaError,
    SchemaError,
    Stored,
)

__all__ = [
    "CheckpointConfig", "DataConfig", "DataSpec", "LoraConfig", "ModelConfig", "RunConfig",
    "RunSpec", "SessionConfig", "TrainConfig", "TrainSpec", "check_run_name", "parse_duration",
    "Cursor", "FileEntry", "Head", "Lease", "Manifest", "SessionRecord", "utcnow",
    "EncodedManifest", "SCHEMA_VERSION", "UPGRADES", "NewerSchemaError", "SchemaError", "Stored",
]
