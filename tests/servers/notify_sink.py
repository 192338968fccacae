"""A local HTTP server that receives notifications: apprise's `json://` scheme posts here.

Each POST is kept (path, parsed JSON body) so a test can read what a session said; nothing
leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.servers.http_body import read_body


class _Handler(BaseHTTPRequestHandler):
    sink: "NotifySink"

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_POST(self):  # noqa: N802 - the http.server name
        body = read_body(self)
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            payload = {"raw": body.decode(errors="replace")}
        with self.sink.lock:
            self.sink.received.append((self.path, payload))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class NotifySink:
    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        handler = type("SinkHandler", (_Handler,), {"sink": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        """An apprise URL that posts JSON to `path` here."""
        return f"json://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def messages(self, path: str) -> list[dict]:
        with self.lock:
            return [p for got, p in self.received if got.split("?")[0] == "/" + path.lstrip("/")]

    def wait(self, path: str, count: int = 1, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages(path)) < count:
            time.sleep(0.05)
        return self.messages(path)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def notify_sink():
    sink = NotifySink()
    yield sink
    sink.stop()
