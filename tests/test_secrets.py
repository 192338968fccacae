"""Secrets never leave the environment: not in stdout, stderr, tracebacks, logs, the store or
any file the agent writes.

The agent runs with recognisable fake tokens (and, for a session that succeeds, SeaweedFS's
real keys) through bad credentials, an unreachable endpoint, a rejected Hub token, a crash
with a traceback, and a normal session; then every byte it printed and every file under the
test's folder (store, workdir, HOME, caches) and every object in the bucket is searched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from tests.agent_helpers import AGENT, ROOT, agent_env, build_tiny_model, write_config, write_data

# Shaped like real credentials so that any scrubbing by pattern is exercised too; assembled
# from parts so that secret scanners reading this file do not take them for leaked ones.
FAKE = {
    "HF_TOKEN": "hf_" + "BatonFakeToken0000secretXYZ123456789",
    "AWS_ACCESS_KEY_ID": "AKIA" + "BATONFAKEKEY7777",
    "AWS_SECRET_ACCESS_KEY": "bAtOnFaKeSeCrEt/0123456789abcdefGHIJKLmn",
    "AWS_SESSION_TOKEN": "FQoBatonFakeSessionToken0000aaaaBBBBcccc",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secrets")
    return {"model": build_tiny_model(folder / "tiny"), "data": write_data(folder / "train.jsonl")}


def run(config: Path, tmp_path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    """agent.py run with HOME and every cache inside tmp_path, so that all it writes is
    searched."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    command = [sys.executable, str(AGENT), "-v", "run", "--config", str(config),
               "--workdir", str(tmp_path / "work"), "--log-every", "0", *flags]
    env = agent_env(HOME=str(home), HF_HOME=str(home / "hf"),
                    XDG_CACHE_HOME=str(home / ".cache"), **env)
    env.update(BATON_TEST_RETRY="2,5")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def leaks(secrets: dict[str, str], done: subprocess.CompletedProcess, folder: Path,
          objects: Optional[dict[str, bytes]] = None) -> list[str]:
    """Where any secret (or its first 16 characters) shows up."""
    places = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode(), **(objects or {})}
    places.update({str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    found = []
    for name, value in secrets.items():
        for needle in {value, value[:16]}:
            found += [f"{name} in {where}" for where, data in places.items()
                      if needle.encode() in data]
    return found


def bucket_objects(server, uri: str) -> dict[str, bytes]:
    bucket = uri[len("s3://"):].split("/", 1)[0]
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {f"s3://{bucket}/{k}": client.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in keys}


def config_for(tiny, tmp_path: Path, store: str, **sections) -> Path:
    return write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=store,
                        **sections)


@pytest.mark.slow
def test_bad_s3_credentials_leak_nothing(tiny, tmp_path, s3_server):
    uri = s3_server.new_bucket_uri()
    done = run(config_for(tiny, tmp_path, uri), tmp_path, **FAKE)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refused the credentials" in done.stderr
    assert leaks(FAKE, done, tmp_path, bucket_objects(s3_server, uri)) == []


@pytest.mark.slow
def test_unreachable_endpoint_leaks_nothing(tiny, tmp_path):
    done = run(config_for(tiny, tmp_path, "s3://baton-nowhere/runs"), tmp_path,
               AWS_ENDPOINT_URL="http://127.0.0.1:9", **FAKE)
    assert done.returncode != 0
    assert "127.0.0.1:9" in done.stderr
    assert leaks(FAKE, done, tmp_path) == []


@pytest.mark.slow
def test_rejected_hub_token_leaks_nothing(tiny, tmp_path, hub_server):
    done = run(config_for(tiny, tmp_path, hub_server.new_repo_uri()), tmp_path,
               **{**FAKE, "HF_ENDPOINT": hub_server.endpoint})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "HF_TOKEN" in done.stderr
    assert leaks(FAKE, done, tmp_path) == []


@pytest.mark.slow
def test_crash_with_a_traceback_leaks_nothing(tiny, tmp_path):
    """A corrupted HEAD.json: whatever the agent prints about it, traceback or message, is
    searched, with the secrets also placed in the data's path to tempt a careless message."""
    store = tmp_path / "store"
    config = config_for(tiny, tmp_path, str(store))
    (store / "t").mkdir(parents=True)
    (store / "t" / "HEAD.json").write_text("{not json " + FAKE["HF_TOKEN"])
    secrets = {k: v for k, v in FAKE.items() if k != "HF_TOKEN"}  # that one is in the store
    done = run(config, tmp_path, **FAKE)
    assert done.returncode in (1, 2)
    assert FAKE["HF_TOKEN"] not in done.stdout + done.stderr
    assert leaks(secrets, done, tmp_path / "work") == []
    assert leaks(secrets, done, tmp_path / "home") == []


@pytest.mark.slow
def test_a_session_that_succeeds_writes_no_secret(tiny, tmp_path, s3_server):
    """Real SeaweedFS keys and a fake HF token: nothing of them in the store's records, the
    workdir, the caches or the output of a verbose (-v, boto3 debug) session."""
    uri = s3_server.new_bucket_uri()
    config = config_for(tiny, tmp_path, uri, train={"max_steps": 2})
    done = run(config, tmp_path, HF_TOKEN=FAKE["HF_TOKEN"])
    assert done.returncode == 0, done.stderr[-3000:]
    secrets = {"HF_TOKEN": FAKE["HF_TOKEN"], "AWS_ACCESS_KEY_ID": s3_server.access_key,
               "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    objects = bucket_objects(s3_server, uri)
    assert any(k.endswith("HEAD.json") and json.loads(v)["finished"] for k, v in objects.items())
    assert leaks(secrets, done, tmp_path, objects) == []
