"""A small fault-injecting HTTP proxy for an S3 API (moto's server): a seeded share of requests gets a 500, a 503
``SlowDown``, or a dropped connection instead of the upstream's answer. Loopback only.

>>> with FaultProxy("http://127.0.0.1:5000", rate=0.15, seed=1) as proxy:
...     boto3.client("s3", endpoint_url=proxy.url)   # every call may now meet a fault
...     proxy.counts                                  # {"pass": ..., "500": ..., "503-slowdown": ..., ...}

Faults:
- ``500``: ``InternalError`` (upstream not called);
- ``503-slowdown``: S3's throttling answer ``SlowDown`` (upstream not called);
- ``drop``: the connection is closed before any answer (upstream not called);
- ``drop-after``: the request reaches the upstream, then the connection is closed (the answer is lost; the client
  cannot tell whether the request took effect);
- ``truncate``: for GETs with a body, the upstream's answer with only half its body, then the connection closes.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
DEFAULT_KINDS = ("500", "503-slowdown", "drop", "drop-after")
_XML = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that vanished mid-request (killed, or dropped by us) is expected here


class FaultProxy:
    """Forward HTTP to ``upstream`` (a loopback URL), injecting faults into a share ``rate`` of requests."""

    def __init__(
        self,
        upstream: str,
        rate: float = 0.1,
        kinds: tuple[str, ...] = DEFAULT_KINDS,
        seed: int = 0,
        hook: Callable[[str, str], str | None] | None = None,
    ):
        """``hook(method, path)`` runs first for every request; a fault kind it returns overrides the random draw."""
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the fault proxy forwards to loopback only, got {upstream!r}")
        unknown = set(kinds) - {*DEFAULT_KINDS, "truncate"}
        if unknown or not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1) and kinds among {DEFAULT_KINDS + ('truncate',)}: {rate}, {kinds}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rate, self.kinds, self.hook = rate, tuple(kinds), hook
        self.counts: Counter[str] = Counter()
        self.by_method: Counter[str] = Counter()  # "<METHOD> <fault>" for injected faults
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def injected(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != "pass")

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            kind = self.hook(method, path) if self.hook else None
            if kind is None:
                kinds = [k for k in self.kinds if k != "truncate" or method == "GET"]
                kind = self._rng.choice(kinds) if kinds and self._rng.random() < self.rate else "pass"
            self.counts[kind] += 1
            if kind != "pass":
                self.by_method[f"{method} {kind}"] += 1
            return kind

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    drop = HOP_BY_HOP if self.command == "HEAD" else HOP_BY_HOP | {"content-length"}
                    return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in drop], data
                finally:
                    conn.close()

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, length: int | None = None):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if self.command != "HEAD":  # a HEAD answer keeps the upstream's Content-Length (the object's size)
                    self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str, message: str) -> None:
                data = _XML.format(code=code, message=message).encode()
                self._reply(status, [("Content-Type", "application/xml")], data)

            def _handle(self) -> None:
                body = self._body()
                kind = proxy._decide(self.command, self.path)
                if kind == "500":
                    return self._error(500, "InternalError", "injected: we encountered an internal error")
                if kind == "503-slowdown":
                    return self._error(503, "SlowDown", "injected: please reduce your request rate")
                if kind == "drop":
                    self.close_connection = True
                    return None
                status, headers, data = self._forward(body)
                if kind == "drop-after":
                    self.close_connection = True
                    return None
                if kind == "truncate" and status == 200 and len(data) > 1:
                    self.close_connection = True
                    return self._reply(status, headers, data[: len(data) // 2], length=len(data))
                return self._reply(status, headers, data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
