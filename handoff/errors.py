"""Errors of the stores. Each says what went wrong and what the user can do about it."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every store failure."""


class ConflictError(StoreError):
    """A conditional write lost: the object exists, or moved past the expected version."""


class NotFoundError(StoreError):
    """The object does not exist."""


class StoreConfigError(StoreError):
    """The store cannot be used as named: bad URI, missing bucket or repo, bad credentials,
    a backend's package not installed. The user must fix something; retrying will not help."""


class StoreUnavailableError(StoreError):
    """Transient faults outlasted the retries: the endpoint is down or unreachable."""


class FencedError(StoreError):
    """This agent's lease generation is below HEAD's: a successor owns the run now."""


class CorruptCheckpointError(StoreError):
    """A checkpoint's files do not match its manifest."""
