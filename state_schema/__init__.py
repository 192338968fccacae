"""Pydantic models of everything Baton stores, with schema versions and upgrades."""

from .cache import EncodedManifest
from .config import (
    CheckpointConfig,
    DataConfig,
    DataSpec,
    EvalConfig,
    HubDataSpec,
    LoraConfig,
    ModelConfig,
    RunConfig,
    RunSpec,
    SessionConfig,
    TrainConfig,
    TrainSpec,
    check_run_name,
    parse_duration,
    parse_eval_every,
)
from .records import Cursor, FileEntry, Head, Lease, Manifest, SessionRecord, utcnow
from .timings import PHASES, SessionTimings
from .versioning import (
    SCHEMA_VERSION,
    UPGRADES,
    NewerSchemaError,
    SchemaError,
    Stored,
)

__all__ = [
    "CheckpointConfig", "DataConfig", "DataSpec", "EvalConfig", "HubDataSpec", "LoraConfig",
    "ModelConfig", "RunConfig", "RunSpec", "SessionConfig", "TrainConfig", "TrainSpec",
    "check_run_name", "parse_duration", "parse_eval_every",
    "Cursor", "FileEntry", "Head", "Lease", "Manifest", "SessionRecord", "utcnow",
    "PHASES", "SessionTimings", "EncodedManifest",
    "SCHEMA_VERSION", "UPGRADES", "NewerSchemaError", "SchemaError", "Stored",
]
