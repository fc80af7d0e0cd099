"""The ASGI layer in front of the routes: the API key and the request limits, before any route reads a byte.

An unauthenticated client never gets a body read; a body over ``max_body_bytes`` is refused from its
Content-Length or as it streams; a ``/v1/moderate`` multipart body with more file parts than
``max_files_per_request`` is refused before anything parses it. The buffered body is then replayed to FastAPI,
which parses it (JSON, ``UploadFile``) as the routes declare. Also here: the content-type rules the routes depend on
(checked before FastAPI validates a body) and the page's security headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.errors import UnsupportedMediaType

from .auth import authorized
from .uploads import _file_parts

UNAUTHORIZED = "missing or wrong API key: send `Authorization: Bearer <key>`"


@dataclass(frozen=True)
class EdgeSettings:
    """What the edge enforces; set on ``app.state.edge`` by the Ingress replica at start."""

    api_key: str | None  # None: open (the start-up rule allowed it)
    max_body_bytes: int
    max_files: int  # /v1/moderate: file parts per request


class Edge:
    """ASGI middleware: ``app.add_middleware(Edge, request_id=fn)``; reads ``EdgeSettings`` from ``app.state.edge``."""

    def __init__(self, app: ASGIApp, request_id: Any):
        self.app, self.request_id = app, request_id

    def _refuse(self, scope: Scope, status: int, message: str) -> JSONResponse:
        rid = self.request_id(Request(scope))
        return JSONResponse({"error": message, "request_id": rid}, status_code=status)

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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not authorized(headers.get("authorization"), settings.api_key):
            return await self._refuse(scope, 401, UNAUTHORIZED)(scope, receive, send)
        limit = settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            message = f"request body is {int(declared)} bytes; the limit is {limit} (`max_body_bytes`)"
            return await self._refuse(scope, 413, message)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                refusal = f"request body is over the limit of {limit} bytes (`max_body_bytes`)"
                return await self._refuse(scope, 413, refusal)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        kind = headers.get("content-type", "")
        if path == "/v1/moderate" and kind.split(";")[0].strip().lower() == "multipart/form-data":
            sent = _file_parts(body, kind)
            if sent > settings.max_files:
                refusal = (
                    f"the request carries {sent} files; the limit is {settings.max_files} (`max_files_per_request`)"
                )
                return await self._refuse(scope, 413, refusal)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# Content-type rules, as route dependencies: they run before FastAPI validates the body.
def json_only(request: Request) -> None:
    """application/json, or no Content-Type at all (read as JSON, as FastAPI and the service always have; a browser's
    cross-site form post always carries a form or text type, so this opens nothing)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/json", ""):
        raise UnsupportedMediaType(f"/v1/generate takes application/json, got {kind!r}")


def upload_kinds(request: Request) -> None:
    """Before FastAPI validates the form: a urlencoded `files=x` is a wrong content type, not a bad field."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/octet-stream", "") and not kind.startswith("image/"):
        raise UnsupportedMediaType(
            f"/v1/moderate takes multipart/form-data (field `files`), image/* or application/octet-stream; got {kind!r}"
        )
