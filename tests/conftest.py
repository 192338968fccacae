"""Shared fixtures: one `store_uri` parametrized over every backend.

S3 runs against a real SeaweedFS server and the Hub against a local HTTP double of its API;
both are started once per test session on free loopback ports (see tests/servers/).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests never reach a real hub or cloud, whatever the developer's shell holds.
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Kernel tests run Triton in its interpreter on the CPU; it must be set before triton is
# imported anywhere, whichever test module is collected first.
os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ["local", "s3", "hub"]

# fixtures_tiny as a plugin, not imported per module: an imported session fixture is built
# once per importing module, the tiny model six times over.
pytest_plugins = ["tests.servers.seaweed", "tests.servers.hub_double", "tests.fixtures_tiny",
                  "tests.servers.notify_sink", "tests.servers.kaggle_double",
                  "tests.fixtures_real"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_uri(backend, request, tmp_path) -> str:
    """A fresh, empty store of the parametrized backend."""
    if backend == "local":
        return str(tmp_path / "store")
    if backend == "s3":
        return request.getfixturevalue("s3_server").new_bucket_uri()
    return request.getfixturevalue("hub_server").new_repo_uri()


@pytest.fixture
def store(store_uri):
    from baton.handoff import open_store

    s = open_store(store_uri)
    yield s
    s.close()
