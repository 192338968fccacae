"""Placeholder until the SeaweedFS fixture lands: S3 tests are skipped."""
import pytest


@pytest.fixture(scope="session")
def s3_server():
    pytest.skip("SeaweedFS fixture not built yet")
