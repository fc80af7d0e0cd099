"""The review app's edge: an ASGI middleware in front of every route that decides, from the request line and headers
alone, whether a request may reach the app, and caps its body before FastAPI reads a byte of it.

In order, each refusal a ``{"detail": ...}`` naming what was received and what is allowed:

1. a repeated ``Host``, ``Authorization``, ``Content-Type`` or ``Content-Length`` header: 400 (two parsers could
   each believe a different one);
2. a ``Host`` that is not a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``, any port) nor the ``--host`` the app
   was bound to nor an ``--allowed-host``: 421 (DNS rebinding: a page on ``evil.example`` whose name now resolves to
   127.0.0.1 sends ``Host: evil.example``);
3. a POST (any method but GET, HEAD, OPTIONS) a browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site``, or whose
   ``Origin`` is not the app's own: 403 (another page, another port of this machine included, cannot decide);
4. outside the public pages (``/``, ``/static/``, the API docs), no ``Authorization: Bearer <key>`` naming a known
   key: 401, before the body is read; the key's reviewer goes into the request's state (``request.state.reviewer``);
5. a body over ``max_body_bytes``, by its ``Content-Length`` or as it streams: 413.

Every response, refusals included, carries the page's security headers (``pipeline.headers``): a CSP with
``frame-ancestors 'none'``, ``X-Frame-Options: DENY``, ``nosniff``, ``no-referrer``.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import AuthConfigError
from ..headers import DOCS_HEADERS, PAGE_HEADERS
from ..keys import KeyRing

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024  # a decision is a few hundred bytes
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SINGLE_HEADERS = ("host", "authorization", "content-type", "content-length")
PUBLIC_PATHS = ("/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # no data in any of them
PUBLIC_PREFIXES = ("/static/", "/static-offline-docs/")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")
UNAUTHORIZED = "missing or wrong API key: send `Authorization: Bearer <key>`"


def host_name(host: str) -> str:
    """``Host`` (or a bind address) without its port, lowercase, an IPv6 address in brackets: ``[::1]:8300`` ->
    ``[::1]``, ``::1`` -> ``[::1]``, ``LocalHost:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    if host.count(":") > 1:  # a bare IPv6 address (a bind address, never a valid Host)
        return f"[{host}]"
    return host.partition(":")[0]


@dataclass(frozen=True)
class EdgeRules:
    """What the edge enforces; built once at start."""

    keys: KeyRing  # the keys accepted on every non-public route, each naming its reviewer
    hosts: frozenset[str]  # Host names allowed besides the loopback ones, as host_name() gives them
    max_body_bytes: int = MAX_BODY_BYTES  # request bodies over this are refused (413)

    @classmethod
    def build(cls, keys: KeyRing, hosts: Iterable[str] = (), max_body_bytes: int = MAX_BODY_BYTES) -> EdgeRules:
        return cls(keys, frozenset(host_name(h) for h in hosts if h.strip()), max_body_bytes)

    def allowed_hosts(self) -> list[str]:
        return [*LOOPBACK_NAMES, *sorted(self.hosts - set(LOOPBACK_NAMES))]

    def host_allowed(self, host: str) -> bool:
        port = host.strip().rpartition("]")[2].partition(":")[2]  # "[::1]:8300", "localhost:8300" -> "8300"
        if port and not port.isdigit():
            return False
        name = host_name(host)
        if name in LOOPBACK_NAMES or name in self.hosts:
            return True
        try:  # any other loopback address literal (127.0.0.2): no name for a rebinding page to point elsewhere
            return ipaddress.ip_address(name.strip("[]")).is_loopback
        except ValueError:
            return False


class ReviewEdge:
    """ASGI middleware: ``app.add_middleware(ReviewEdge, rules=EdgeRules.build(KeyRing.single(key, "ana")))``."""

    def __init__(self, app: ASGIApp, rules: EdgeRules):
        self.app, self.rules = app, rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the app has none: refuse before any rule could be skipped
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        secured = self._secure(send, DOCS_HEADERS if path in DOCS_PATHS else PAGE_HEADERS)
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message = refusal
            if status != 401:
                log.warning("refused %s %s: %d %s", scope["method"], path, status, message)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse({"detail": message}, status, headers)(scope, receive, secured)
        body = await self._body(scope, receive)
        if isinstance(body, JSONResponse):
            return await body(scope, receive, secured)
        if body is None:  # the client went away
            return None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, secured)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, message) for a request refused on its request line and headers; None when it may go on (then
        with its key's reviewer in ``scope["state"]``)."""
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        for name in SINGLE_HEADERS:
            if len(headers.get(name, ())) > 1:
                return 400, f"the {name.title()} header was sent {len(headers[name])} times; send it once"
        host = headers.get("host", [""])[0]
        if not self.rules.host_allowed(host):
            allowed = ", ".join(self.rules.allowed_hosts())
            return 421, (
                f"Host {host!r} is not one this app answers to; allowed: {allowed} (any port). "
                "Behind a proxy or on another name, start it with `--allowed-host NAME`"
            )
        if scope["method"] not in SAFE_METHODS:
            site = headers.get("sec-fetch-site", [""])[0].strip().lower()
            if site in ("cross-site", "same-site"):
                return 403, f"a {site} {scope['method']} is refused: decisions are made from the review page itself"
            origin = headers.get("origin", [None])[0]
            if origin is not None and urlsplit(origin.strip()).netloc.lower() != host.strip().lower():
                return 403, f"Origin {origin!r} is not this app's ({host!r}): decisions are made from its own page"
        path = scope["path"]
        if scope["method"] in SAFE_METHODS and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
            return None
        key = self.rules.keys.find(headers.get("authorization", [None])[0])
        if key is None:
            return 401, UNAUTHORIZED
        scope.setdefault("state", {})["reviewer"] = key.reviewer
        declared = headers.get("content-length", [""])[0].strip()
        if declared and not declared.isdigit():
            return 400, f"Content-Length {declared!r} is not a number of bytes"
        if declared and int(declared) > self.rules.max_body_bytes:
            return 413, f"the request body is {int(declared)} bytes; the limit is {self.rules.max_body_bytes}"
        return None

    async def _body(self, scope: Scope, receive: Receive) -> bytes | JSONResponse | None:
        """The whole body, read here up to the limit (a refusal past it); None when the client disconnected."""
        limit, chunks, size = self.rules.max_body_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                log.warning("refused %s %s: 413 body over %d bytes", scope["method"], scope["path"], limit)
                detail = f"the request body is over the limit of {limit} bytes"
                return JSONResponse({"detail": detail}, 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _secure(send: Send, extra: dict[str, str]) -> Send:
        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        return secured


def edge_rules(
    api_key: str | None, keys: KeyRing | None, reviewer: str, hosts: Iterable[str] = ()
) -> tuple[EdgeRules, str | None]:
    """The rules for an app with ``api_key`` (its holder is ``reviewer``), or ``keys`` (each key its own reviewer), or
    neither: then a random token made here, for this start only, is the key (returned, to be shown to the user)."""
    if api_key is not None and keys is not None:
        raise AuthConfigError(f"both an API key and {keys.source} are set: set only one (each key names its reviewer)")
    token = secrets.token_urlsafe(32) if api_key is None and keys is None else None
    if keys is None:
        keys = KeyRing.single(
            api_key or str(token), reviewer, "the API key" if token is None else "the per-start token"
        )
    return EdgeRules.build(keys, hosts), token
