"""Schema versions of stored documents, and the upgrades from older ones.

Every stored document carries `schema_version` as "MAJOR.MINOR". A minor bump only adds
optional fields, so an older reader ignores what it does not know and a newer reader fills
defaults. A major bump changes meaning: a reader refuses a newer major (the agent that wrote
it is newer than this one) and upgrades an older major through the functions registered here.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 0
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

Upgrade = Callable[[dict[str, Any]], dict[str, Any]]
# (document kind, major it upgrades from) -> function returning the document at major + 1
UPGRADES: dict[tuple[str, int], Upgrade] = {}


class SchemaError(ValueError):
    """A stored document cannot be read: wrong version, not JSON, or invalid fields."""


class NewerSchemaError(SchemaError):
    """The document was written by a newer Baton than this one."""


class Stored(BaseModel):
    """Base of every stored document. Unknown fields from a newer minor version are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=False)
    schema_version: str = Field(default=SCHEMA_VERSION)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls: type[T], raw: bytes | str, *, source: str = "document") -> T:
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SchemaError(f"{source} is not valid JSON ({exc}); the file is corrupted") from exc
        if not isinstance(doc, dict):
            raise SchemaError(f"{source} should hold a JSON object, found {type(doc).__name__}")
        doc = upgrade(cls.__name__, doc, source=source)
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise SchemaError(f"{source} is not a valid {cls.__name__}: {exc}") from exc


T = TypeVar("T", bound=Stored)


def parse_version(text: str, *, source: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(text).split("."))
    except ValueError as exc:
        raise SchemaError(f"{source} has a malformed schema_version {text!r}") from exc
    return major, minor


def upgrade(kind: str, doc: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Bring `doc` to the current major version, or refuse one from a newer Baton."""
    major, _ = parse_version(doc.get("schema_version", "1.0"), source=source)
    if major > SCHEMA_MAJOR:
        raise NewerSchemaError(
            f"{source} uses schema {doc['schema_version']}, newer than this Baton understands "
            f"({SCHEMA_VERSION}); upgrade Baton (git pull) on this machine"
        )
    while major < SCHEMA_MAJOR:
        step = UPGRADES.get((kind, major))
        if step is None:
            raise SchemaError(f"{source}: no upgrade of {kind} from schema {major}.x is known")
        doc = step(dict(doc))
        major += 1
        doc["schema_version"] = f"{major}.0"
    return doc
