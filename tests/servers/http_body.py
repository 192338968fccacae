"""Reading a request body in the stdlib HTTP servers of the tests (Hub double, fault proxy)."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The whole body, whether sent with Content-Length or chunked (some clients stream)."""
    if handler.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    chunks = []
    while size := int(handler.rfile.readline().split(b";")[0].strip(), 16):
        chunks.append(handler.rfile.read(size))
        handler.rfile.readline()  # the CRLF after each chunk
    handler.rfile.readline()  # the CRLF after the last, empty chunk
    return b"".join(chunks)
