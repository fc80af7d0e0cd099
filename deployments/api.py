"""The FastAPI application the Ingress serves: the edge middleware, the page's static files, and every error in the
one shape ``{"error", "request_id"}`` (503s and 429s with ``Retry-After``), mapped in one place.

An error on a decision route (``/v1/generate``, ``/v1/moderate``) after the caller was known is also handed to
``app.state.on_error`` (the Ingress's audit hook), so refused and failed requests are recorded beside answered ones.
"""

# No `from __future__ import annotations`: FastAPI resolves these handlers' and dependencies' annotations at runtime.

import logging
import math
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from pipeline.errors import DiffguardError, Unauthorized

from .edge import UNAUTHORIZED, Edge
from .validation import describe_validation

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"

# Swagger UI and ReDoc from the assets fastapi-offline ships (no CDN): /docs and /redoc render with no network.
api = FastAPIOffline(
    title="diffguard",
    description="Moderated text-to-image generation and image moderation. Every image that leaves was scored by "
    'the safety checker in the same request. Errors are always `{"error", "request_id"}`. The page at `/` '
    "drives this API.",
    version="0.1.0",
)


def _error(status: int, message: str, request_id: str, retry_after: int | None = None) -> JSONResponse:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse({"error": message, "request_id": request_id}, status_code=status, headers=headers)


def _failed(request: Request, status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    """The error response, after telling the audit hook (decision routes only, once the edge knew the caller)."""
    hook: Any = getattr(request.app.state, "on_error", None)
    if hook is not None and getattr(request.state, "caller", None) is not None:
        hook(request, status, message)
    return _error(status, message, request_id(request), retry_after)


def request_id(request: Request) -> str:
    """Serve's own request id (it honours a client's X-Request-ID and returns it in the response header)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        try:
            from ray.serve.context import _get_serve_request_context

            rid = _get_serve_request_context().request_id
        except Exception:  # noqa: BLE001 - outside a replica
            rid = ""
        rid = rid or uuid.uuid4().hex
        request.state.request_id = rid
    return rid


api.add_middleware(Edge, request_id=request_id)  # the key and the body limits before any route reads the body
api.mount("/page", StaticFiles(directory=STATIC), name="page")


@api.exception_handler(DiffguardError)
async def _diffguard_error(request: Request, exc: DiffguardError) -> JSONResponse:
    retry = request.app.state.retry_after_s if exc.status_code == 503 else None
    if exc.status_code == 429:
        retry = max(1, math.ceil(getattr(exc, "retry_after_s", 1)))
    message = getattr(exc, "message", None) or str(exc)  # errors re-raised from another replica keep only str()
    return _failed(request, exc.status_code, message, retry)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors in the one error shape: the field, the value received and what is allowed."""
    limits = getattr(request.app.state, "limits", None)
    return _failed(request, 422, describe_validation(exc.errors(), limits))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (404, 405, a malformed multipart body) in the one error shape."""
    rid, causes, cause = request_id(request), [], exc.__cause__ or exc.__context__
    while cause is not None and len(causes) < 5:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, RecursionError) for c in causes):  # FastAPI's JSON parse hit the recursion limit
        return _error(422, "the JSON body is nested too deeply; requests are flat objects of fields", rid)
    if exc.status_code == 400 and str(request.url.path).endswith("/v1/generate"):  # FastAPI could not parse it
        why = next((str(c) for c in causes if isinstance(c, ValueError)), "not UTF-8 JSON")
        return _error(422, f"the body is not valid JSON ({why[:200]})", rid)
    message = str(exc.detail)
    if exc.status_code == 400 and message.startswith("Too many files"):  # past starlette's own file cap
        limit = request.app.state.edge.max_files
        return _error(413, f"the request carries more than {limit} files (`max_files_per_request`)", rid)
    if exc.status_code == 400 and str(request.url.path).endswith("/v1/moderate"):
        message = f"malformed multipart body: {message}"
    return _error(exc.status_code, message, rid)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id(request)
    log.error("request %s failed: %r", rid, exc, exc_info=exc)
    return _failed(request, 500, "internal error; quote the request id when reporting it")


_bearer = HTTPBearer(
    auto_error=False, description="a key of DIFFGUARD_KEYS_FILE, or DIFFGUARD_API_KEY, when the service has one"
)


async def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Per route: the Edge middleware found the caller (and refused wrong keys before reading the body); declares
    the scheme in the OpenAPI document."""
    if getattr(request.state, "caller", None) is None:
        raise Unauthorized(UNAUTHORIZED)
