"""A local HTTP double of the two Kaggle API calls scripts/autopilot.py makes.

The official `kaggle` client (kagglesdk) POSTs JSON to `<endpoint>/api/v1/<service>/<method>`;
its endpoint comes only from KAGGLE_API_ENVIRONMENT (LOCALHOST: http://localhost), so the
client reaches this double as an HTTP proxy (HTTP_PROXY=127.0.0.1:<port>): requests then sends
the absolute URL here, and no fixed port is needed. Three methods are served:

- `kernels.KernelsApiService/SaveKernel` (`kaggle kernels push`): a new version, refused with
  409 while the latest version is queued or running;
- `kernels.KernelsApiService/GetKernelSessionStatus` (`kaggle kernels status`): the latest
  version's state, 404 for a kernel without versions;
- `kernels.KernelsApiService/GetAcceleratorQuotaStatistics` (`kaggle quota`, `quota_view`): the
  weekly GPU quota from the state's `quota_*` fields, on the wire as Kaggle's JSON has it
  (durations as "<seconds>s", the refresh time as ISO UTC with a Z).

A pushed version "runs" the test's `on_push(version)` in a thread (a stand-in for the notebook:
it may commit a checkpoint to the run's store), then ends COMPLETE, or ERROR when the callable
returns "ERROR" or raises.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import urlsplit

import pytest

from tests.servers.http_body import read_body

USER, KEY = "kaggle-user", "kaggle-double-key-0123"
API = "/api/v1/kernels.KernelsApiService/"


@dataclass
class Version:
    number: int
    slug: str
    request: dict
    status: str = "RUNNING"


@dataclass
class KaggleState:
    versions: dict[str, list[Version]] = field(default_factory=dict)  # "owner/slug" -> versions
    on_push: Callable[[Version], Optional[str]] = lambda v: None
    refused: int = 0
    pushes: int = 0  # SaveKernel calls
    # On this SaveKernel call, a person's own push lands first ("Save & Run" in the web UI),
    # so the API refuses the caller: the race the autopilot must survive.
    hand_push_on: Optional[int] = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The weekly GPU quota: 30 h by default, none of it used; a test moves these.
    quota_total_s: float = 30 * 3600.0
    quota_used_s: float = 0.0
    quota_reserved_s: float = 0.0
    quota_refresh: datetime = field(
        default_factory=lambda: datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
        + timedelta(days=3))
    quota_reads: int = 0

    def latest(self, slug: str) -> Optional[Version]:
        found = self.versions.get(slug)
        return found[-1] if found else None

    def start(self, slug: str, request: dict) -> Version:
        """A new version, run in a thread like a notebook session."""
        with self.lock:
            version = Version(len(self.versions.get(slug, [])) + 1, slug, request)
            self.versions.setdefault(slug, []).append(version)
        threading.Thread(target=self._run, args=(version,), daemon=True).start()
        return version

    def _run(self, version: Version) -> None:
        try:
            outcome = self.on_push(version) or "COMPLETE"
        except Exception:  # noqa: BLE001 - a crashed stand-in is a failed notebook
            outcome = "ERROR"
        with self.lock:
            version.status = outcome


class _Handler(BaseHTTPRequestHandler):
    state: KaggleState

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - the http.server name
        body = json.loads(read_body(self) or b"{}")
        path = urlsplit(self.path).path  # absolute-form: the client speaks to a proxy
        expected = "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self._json(401, {"code": 401, "message": "Unauthenticated"})
        if path == API + "SaveKernel":
            return self._save(body)
        if path == API + "GetKernelSessionStatus":
            return self._status(f"{body.get('userName')}/{body.get('kernelSlug')}")
        if path == API + "GetAcceleratorQuotaStatistics":
            return self._quota()
        return self._json(404, {"code": 404, "message": f"no route for {path}"})

    def _save(self, body: dict) -> None:
        slug = body["slug"]
        with self.state.lock:
            self.state.pushes += 1
            by_hand = self.state.pushes == self.state.hand_push_on
        if by_hand:
            self.state.start(slug, body)
        with self.state.lock:
            latest = self.state.latest(slug)
            busy = latest is not None and latest.status in ("QUEUED", "RUNNING")
            if busy:
                self.state.refused += 1
        if busy:
            return self._json(409, {"code": 409, "message": f"Kernel {slug} already has a "
                                                            "version running"})
        version = self.state.start(slug, body)
        self._json(200, {"ref": f"/code/{slug}", "url": f"https://www.kaggle.com/code/{slug}",
                         "versionNumber": version.number, "kernelId": 1})

    def _status(self, slug: str) -> None:
        with self.state.lock:
            latest = self.state.latest(slug)
            status = None if latest is None else latest.status
        if status is None:
            return self._json(404, {"code": 404, "message": f"kernel {slug} not found"})
        self._json(200, {"status": status,
                         "failureMessage": "the notebook raised" if status == "ERROR" else None})


    def _quota(self) -> None:
        with self.state.lock:
            st = self.state
            st.quota_reads += 1
            gpu = {"timeUsed": f"{int(st.quota_used_s)}s",
                   "timeReserved": f"{int(st.quota_reserved_s)}s",
                   "totalTimeAllowed": f"{int(st.quota_total_s)}s",
                   "minimumTimeAllowed": f"{int(st.quota_total_s)}s", "hasEverRun": True}
            refresh = st.quota_refresh.isoformat(timespec="milliseconds") + "Z"
        self._json(200, {"quotaRefreshTime": refresh, "gpuQuota": gpu})


class KaggleDouble:
    def __init__(self):
        self.state = KaggleState()
        handler = type("KaggleHandler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.proxy = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def env(self, home: str) -> dict[str, str]:
        """What a process needs to reach this double through the real client."""
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_USERNAME": USER,
                "KAGGLE_KEY": KEY, "KAGGLE_CONFIG_DIR": home, "HOME": home,
                "HTTP_PROXY": self.proxy, "http_proxy": self.proxy,
                "NO_PROXY": "", "no_proxy": ""}

    def versions(self, slug: str) -> list[Version]:
        with self.state.lock:
            return list(self.state.versions.get(slug, []))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def kaggle_server():
    server = KaggleDouble()
    yield server
    server.stop()
