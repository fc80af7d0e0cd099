"""The ASGI layer in front of the routes: the caller's key, its routes and request quota, and the request limits,
before any route reads a byte.

The key names the caller (:mod:`deployments.tenancy`): an unknown key is a 401, a route outside the key's `routes:` a
403, a key over its `requests_per_s` a 429 with ``Retry-After`` (the quota keeper's answer, before the body is read);
the caller is then in ``request.state.caller`` for the routes, and every response names its tenant
(``X-Diffguard-Tenant``).

Headers the edge decides on must come once (a duplicate is a 400: Starlette reads the first, a dict the last). An
unauthenticated client never gets a body read; a keyless service refuses browsers' cross-site requests (403); a body
over ``max_body_bytes`` is refused from its Content-Length or as it streams, and one that does not arrive within
``body_read_timeout_s`` gets a 408; a ``/v1/moderate`` multipart body with more file parts than
``max_files_per_request`` is refused before FastAPI parses it. The buffered body is then replayed to FastAPI, which
parses it (JSON, ``UploadFile``) as the routes declare. Also here: the content-type rules the routes depend on
(checked before FastAPI validates a body) and the page's security headers.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.errors import PayloadTooLarge, UnsupportedMediaType

from .tenancy import Callers, route_refusal
from .uploads import _file_parts, media_type

UNAUTHORIZED = "missing or wrong API key: send `Authorization: Bearer <key>`"
TENANT_HEADER = b"x-diffguard-tenant"  # on every response to a known caller: its tenant
# Headers the edge or the routes decide on: each must come once, so every reader sees the same value.
SINGLE = ("content-type", "content-length", "authorization", "host", "origin", "sec-fetch-site")
# A keyless service answers only these Sec-Fetch-Site values. `same-site` is refused too: any port of the same host
# is the same site (http://localhost:3000 and http://localhost:8000), so any local dev server could drive it.
OWN_SITE = ("same-origin", "none")


@dataclass(frozen=True)
class EdgeSettings:
    """What the edge enforces; set on ``app.state.edge`` by the Ingress replica at start."""

    api_key: str | None  # the single key (None: a keys file in ``callers``, or open where the start-up rule allowed it)
    max_body_bytes: int
    max_files: int  # /v1/moderate: file parts per request
    body_read_timeout_s: float = 30.0  # the whole body must arrive within this, else 408
    callers: Callers = field(default=None)  # type: ignore[assignment] - the keys in force (default: ``api_key``'s)
    quota: Any = None  # a QuotaClient (deployments.quota): each key's requests_per_s, before its body is read

    def __post_init__(self) -> None:
        if self.callers is None:
            object.__setattr__(self, "callers", Callers.single(self.api_key))


def duplicated(scope: Scope) -> str | None:
    """The first of the ``SINGLE`` headers that the request carries more than once, or None."""
    seen: set[str] = set()
    for raw, _ in scope["headers"]:
        name = raw.decode("latin-1").lower()
        if name in SINGLE:
            if name in seen:
                return name
            seen.add(name)
    return None


def cross_site(headers: dict[str, str]) -> str | None:
    """Why a keyless service refuses this request as a browser's cross-site one, or None (curl and SDKs send neither
    header). The Origin's host and port must be the Host header's; the scheme is not compared, as a TLS proxy in front
    makes an https page's requests arrive as http."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in OWN_SITE:
        return f"`Sec-Fetch-Site: {site}`; allowed: {' or '.join(OWN_SITE)}, or no such header"
    origin, host = headers.get("origin"), headers.get("host", "").lower()
    if origin is not None:
        try:
            authority = urlsplit(origin.strip()).netloc.lower()
        except ValueError:
            authority = ""
        if not authority or authority != host:
            return f"`Origin: {origin}`, which is not this service's `Host: {host}`"
    return None


class Edge:
    """ASGI middleware: ``app.add_middleware(Edge, request_id=fn)``; reads ``EdgeSettings`` from ``app.state.edge``."""

    def __init__(self, app: ASGIApp, request_id: Any):
        self.app, self.request_id = app, request_id

    def _refuse(self, scope: Scope, status: int, message: str, **headers: str) -> JSONResponse:
        rid = self.request_id(Request(scope))
        return JSONResponse({"error": message, "request_id": rid}, status_code=status, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        settings: EdgeSettings | None = getattr(scope["app"].state, "edge", None)
        if settings is None:  # never configured: fail closed
            return await self._refuse(scope, 503, "the service is starting; retry later")(scope, receive, send)
        twice = duplicated(scope)
        if twice is not None:
            message = f"the request carries more than one `{twice}` header; send each of {', '.join(SINGLE)} once"
            return await self._refuse(scope, 400, message)(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        started = time.perf_counter()
        caller = settings.callers.find(headers.get("authorization"))
        if caller is None:
            return await self._refuse(scope, 401, UNAUTHORIZED)(scope, receive, send)
        why = cross_site(headers) if not settings.callers.required else None
        if why is not None:
            message = f"refused a cross-site browser request ({why}): this service has no API key"
            return await self._refuse(scope, 403, message)(scope, receive, send)
        named = {"X-Diffguard-Tenant": caller.tenant}
        refusal = route_refusal(caller, path)
        if refusal is not None:
            return await self._refuse(scope, 403, refusal, **named)(scope, receive, send)
        state = scope.setdefault("state", {})
        state["caller"], state["started"] = caller, started  # the routes read them (tenant, policy, latency)
        if settings.quota is not None and path in ("/v1/generate", "/v1/moderate"):
            decision = await settings.quota.take(caller.id, caller.limits, requests=1, tenant=caller.tenant)
            if decision is not None and not decision.allowed:
                retry = str(max(1, math.ceil(decision.retry_after_s)))
                refused = self._refuse(scope, 429, decision.reason, **named, **{"Retry-After": retry})
                return await refused(scope, receive, send)
        limit = settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            message = f"request body is {int(declared)} bytes; the limit is {limit} (`max_body_bytes`)"
            return await self._refuse(scope, 413, message, **named)(scope, receive, send)
        try:
            async with asyncio.timeout(settings.body_read_timeout_s):  # for the whole body, not per chunk
                body = await _read_body(receive, limit)
        except PayloadTooLarge as exc:
            return await self._refuse(scope, 413, exc.message, **named)(scope, receive, send)
        except TimeoutError:
            deadline = settings.body_read_timeout_s
            message = f"the request body did not arrive within {deadline:g}s (`body_read_timeout_s`)"
            return await self._refuse(scope, 408, message, Connection="close", **named)(scope, receive, send)
        if body is None:  # the client went away
            return None
        kind = headers.get("content-type", "")
        if path == "/v1/moderate" and media_type(kind) == "multipart/form-data":
            sent = _file_parts(body, kind)
            if sent > settings.max_files:
                refusal = (
                    f"the request carries {sent} files; the limit is {settings.max_files} (`max_files_per_request`)"
                )
                return await self._refuse(scope, 413, refusal, **named)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        tenant = caller.tenant.encode("latin-1", "replace")

        async def tagged(message: Message) -> None:  # every response past the key check names the caller's tenant
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (TENANT_HEADER, tenant)]}
            await send(message)

        await self.app(scope, replay, tagged)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None when the client disconnected; over ``limit`` bytes raises ``PayloadTooLarge``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes (`max_body_bytes`)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# Content-type rules, as route dependencies: they run before FastAPI validates the body.
async def json_only(request: Request) -> None:
    """application/json only. A body without a Content-Type is refused too: a cross-site ``fetch`` in ``no-cors`` mode
    with a Blob body sends exactly that, without a preflight."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        got = repr(kind) if kind else "no Content-Type header"
        raise UnsupportedMediaType(f"/v1/generate takes `Content-Type: application/json`; got {got}")


async def upload_kinds(request: Request) -> None:
    """Before FastAPI validates the form: a urlencoded `files=x` is a wrong content type, not a bad field."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/octet-stream", "") and not kind.startswith("image/"):
        raise UnsupportedMediaType(
            f"/v1/moderate takes multipart/form-data (field `files`), image/* or application/octet-stream; got {kind!r}"
        )
