"""Placeholder until the Hub test double lands: Hub tests are skipped."""
import pytest


@pytest.fixture(scope="session")
def hub_server():
    pytest.skip("Hub test double not built yet")
