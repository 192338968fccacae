"""A fault-injecting HTTP proxy for store tests.

It sits between a client (boto3, huggingface_hub) and a real server and, on the requests a
rule matches, answers with a fault instead of (or in the middle of) the real exchange:
a reset connection, a 500, a 503 SlowDown, a stall past the client's timeout, or a body cut
short. Headers pass through untouched, so S3 signatures (which cover the Host header) stay valid.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from tests.servers.http_body import read_body

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error.</Message></Error>")

Match = Callable[[str, str], bool]  # (method, path) -> bool


@dataclass
class Rule:
    kind: str  # reset | 500 | 503 | stall | truncate
    times: int  # how many matching requests it hits; -1 = every one
    match: Match
    stall_s: float = 30.0
    hits: int = 0


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, outcome)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Optional[ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def inject(self, kind: str, *, times: int = 1, match: Match = lambda m, p: True,
               stall_s: float = 30.0) -> Rule:
        rule = Rule(kind, times, match, stall_s)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def take_fault(self, method: str, path: str) -> Optional[Rule]:
        with self.lock:
            for rule in self.rules:
                if rule.times != 0 and rule.match(method, path):
                    rule.times -= 1 if rule.times > 0 else 0
                    rule.hits += 1
                    return rule
        return None

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a reset or truncated exchange is the point, not an error to print


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def _relay(self) -> None:
        body = read_body(self)
        rule = self.owner.take_fault(self.command, self.path)
        outcome = rule.kind if rule else "ok"
        self.owner.log.append((self.command, self.path, outcome))
        if rule and rule.kind == "reset":
            self._reset()
            return
        if rule and rule.kind in ("500", "503"):
            self._answer(int(rule.kind), SLOW_DOWN if rule.kind == "503" else INTERNAL)
            return
        if rule and rule.kind == "stall":
            time.sleep(rule.stall_s)
        status, headers, payload = self._forward(body)
        if rule and rule.kind == "truncate" and len(payload) > 1:
            self._send(status, headers, payload[: len(payload) // 2], length=len(payload))
            self.close_connection = True
            return
        self._send(status, headers, payload)

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port,
                                          timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        return resp.status, resp.getheaders(), payload

    def _send(self, status, headers, payload: bytes, length: Optional[int] = None) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(length if length is not None else len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _answer(self, status: int, payload: bytes) -> None:
        self._send(status, [("Content-Type", "application/xml")], payload)

    def _reset(self) -> None:
        # SO_LINGER 0 turns close() into an RST: the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay
