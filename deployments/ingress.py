"""The HTTP front (FastAPI via ``@serve.ingress``): validation, auth, limits, and translation to and from the core.

No scoring or policy logic lives here: images go to the checker deployment, verdicts and images go through the
core's ``pipeline.moderate.moderate``, and only what that releases is PNG-encoded. Any failure before a verdict
exists is a 503 with no image bytes.
"""

# No `from __future__ import annotations`: Serve pickles this class by value, and FastAPI must resolve the routes'
# annotations (Request) in the replica, where string annotations name globals the pickle may not carry.

import asyncio
import base64
import html
import io
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, File, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Histogram
from starlette.exceptions import HTTPException

from pipeline.errors import (
    DiffguardError,
    ImageDecodeError,
    InvalidInput,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from pipeline.headers import PAGE_HEADERS
from pipeline.images import DecodeLimits

from .auth import api_key, auth_info, authorized, require_key_or_loopback
from .edge import UNAUTHORIZED, Edge, EdgeSettings, json_only, upload_kinds
from .health import ReplicaState, http_host
from .schemas import (
    RAW_IMAGE_BODY,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    InfoResponse,
    ModerateResponse,
    error_responses,
    schema_with_limits,
)
from .settings import IngressArgs
from .uploads import check_request_pixels, listing
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


def _request_id(request: Request) -> str:
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


api.add_middleware(Edge, request_id=_request_id)  # the key and the body limits before any route reads the body
api.mount("/page", StaticFiles(directory=STATIC), name="page")


@api.exception_handler(DiffguardError)
async def _diffguard_error(request: Request, exc: DiffguardError) -> JSONResponse:
    retry = request.app.state.retry_after_s if exc.status_code == 503 else None
    message = getattr(exc, "message", None) or str(exc)  # errors re-raised from another replica keep only str()
    return _error(exc.status_code, message, _request_id(request), retry)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors in the one error shape: the field, the value received and what is allowed."""
    limits = getattr(request.app.state, "limits", None)
    return _error(422, describe_validation(exc.errors(), limits), _request_id(request))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (404, 405, a malformed multipart body) in the one error shape."""
    rid, causes, cause = _request_id(request), [], exc.__cause__ or exc.__context__
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
    rid = _request_id(request)
    log.error("request %s failed: %r", rid, exc, exc_info=exc)
    return _error(500, "internal error; quote the request id when reporting it", rid)


_bearer = HTTPBearer(auto_error=False, description="DIFFGUARD_API_KEY, when the service has one (see /v1/info `auth`)")


def _authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Per route (the Edge middleware already refused wrong keys before reading the body); declares the scheme."""
    if not authorized(request.headers.get("authorization"), request.app.state.edge.api_key):
        raise Unauthorized(UNAUTHORIZED)


def _png_base64(image: Any) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    max_queued_requests=512,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        checker: DeploymentHandle,
        generator: DeploymentHandle | None,
        args: dict[str, Any] | None = None,
        image_limits: DecodeLimits | None = None,
    ):
        from pipeline.requests import GenerationLimits

        self.args = IngressArgs(**(args or {}))
        self.checker, self.generator = checker, generator
        self.limits = GenerationLimits(**self.args.limits)
        self.image_limits = image_limits or DecodeLimits()  # the checker's: the edge prices uploads in its views
        key = api_key(os.environ)  # stripped; empty or whitespace refuses to start
        self.host = http_host()
        require_key_or_loopback(self.host, key, self.args.allow_unauthenticated)  # else DEPLOY_FAILED, with why
        self.auth = auth_info(key, self.args.allow_unauthenticated, self.host)
        api.state.edge = EdgeSettings(
            key, self.args.max_body_bytes, self.args.max_files_per_request, self.args.body_read_timeout_s
        )
        api.state.limits = self.limits
        api.state.retry_after_s = self.args.retry_after_s
        api.openapi_schema = None
        api.openapi = self._openapi  # this deployment's limits as the schema's bounds
        self.state = ReplicaState(serve.get_replica_context().app_name, self.args.health_timeout_s)
        self.generator_info: dict[str, Any] | None = None  # static per replica: fetched once, never behind renders
        self.latency = Histogram(
            "diffguard_moderation_latency_s",
            description="time from receiving images to their verdicts",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("route",),
        )

    def _openapi(self) -> dict[str, Any]:
        if api.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            api.openapi_schema = schema_with_limits(document, self.limits, self.args.max_files_per_request)
        return api.openapi_schema

    async def _call(self, response: Any, timeout: float, what: str) -> Any:
        """Await a handle call; every way it can fail becomes a 503 (``Unavailable``)."""
        try:
            return await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()
            raise Unavailable(f"the {what} did not answer within {timeout:g}s; nothing was released") from None
        except DiffguardError:
            raise
        except Exception as exc:  # noqa: BLE001 - BackPressureError, actor death, deployment unavailable, ...
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DiffguardError) and cause.status_code < 500:
                raise cause from None
            log.warning("%s call failed: %r", what, exc)
            raise Unavailable(f"the {what} is unavailable ({type(exc).__name__}); nothing was released") from None

    async def _check(self, images: list[Any], route: str) -> list[dict[str, Any]]:
        start = time.perf_counter()
        results = await self._call(self.checker.check_many.remote(images), self.args.checker_timeout_s, "checker")
        if len(results) != len(images) or any("unavailable" in r for r in results):
            reason = next((r["unavailable"] for r in results if "unavailable" in r), "wrong number of results")
            raise Unavailable(f"the checker could not score the images ({reason}); nothing was released")
        self.latency.observe(time.perf_counter() - start, tags={"route": route})
        return results

    @api.get("/", include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        """The page: plain HTML, CSS and JavaScript from the package, driving this API (no CDN, works offline)."""
        base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
        text = (STATIC / "index.html").read_text().replace("{{base}}", base)
        return HTMLResponse(text, headers=PAGE_HEADERS)

    @api.post(
        "/v1/generate",
        dependencies=[Depends(_authorize), Depends(json_only)],
        response_model=GenerateResponse,
        responses=error_responses(400, 401, 403, 408, 413, 415, 422, 503),
    )
    async def generate(self, request: Request, body: GenerateRequest) -> dict[str, Any]:
        """Generate images from a prompt. Every image is scored by the checker in this request and the policy
        decides what leaves: allowed and flagged images as they are, blurred or black ones as such, blocked ones not
        at all (`image_png_base64` is null). No verdict, no pixels: a 503."""
        from pipeline.moderate import model_info, moderate

        rid = _request_id(request)
        if self.generator is None:
            raise Unavailable("this deployment serves moderation only (no generator configured)")
        body.check(self.limits)  # this deployment's limits (the schema shows them); InvalidInput names each field
        log.info("request %s: generate %d image(s), %d steps, safety=%s", rid, body.num_images, body.steps, body.safety)
        rendering = await self._call(
            self.generator.render.remote(body.model_dump()), self.args.generator_timeout_s, "generator"
        )
        images = rendering["images"]
        self.generator_info = self.generator_info or rendering["info"]
        results = await self._check(images, "generate")
        moderated = moderate(images, [r["verdict"] for r in results])
        models = model_info(rendering["info"], results[0]["checker"])  # the replicas that rendered and scored these
        models["checker_fingerprint"] = results[0]["fingerprint"]  # the policy that scored these very images
        out = []
        for m, r in zip(moderated, results, strict=True):
            row = m.report()  # the core's one shape for a moderated image
            row["moderation"].update(action=m.action, batch_size=r["batch_size"])
            row["image_png_base64"] = _png_base64(m.image) if m.image is not None else None
            out.append(row)
        log.info("request %s: %s", rid, [m.action for m in moderated])
        return {
            "request_id": rid,
            "seed": rendering["seed"],
            "width": rendering["width"],
            "height": rendering["height"],
            "warnings": rendering["warnings"],
            "generator_batch_size": rendering.get("batch_size", 1),
            "images": out,
            "models": models,
        }

    @api.post(
        "/v1/moderate",
        dependencies=[Depends(_authorize), Depends(upload_kinds)],
        response_model=ModerateResponse,
        responses=error_responses(400, 401, 403, 408, 413, 415, 422, 503),
        openapi_extra=RAW_IMAGE_BODY,
    )
    async def moderate_uploads(
        self,
        request: Request,
        files: list[UploadFile] | None = File(None, description="one or more images (multipart/form-data)"),
        x_filename: str | None = Header(None, description="the filename reported for a raw image body"),
    ) -> dict[str, Any]:
        """Score uploaded images: multipart with one or more `files`, or one raw `image/*` or
        `application/octet-stream` body. An undecodable file gets its own row with `error` (the policy's
        unscorable action); only when every file fails is it a 400."""
        from pipeline.policy import outcome

        rid = _request_id(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            if not files:
                fields = sorted((await request.form()).keys())
                raise InvalidInput(f"multipart body has no `files` field with a file; fields: [{listing(fields)}]")
            if len(files) > self.args.max_files_per_request:  # the Edge counted parts; this counts what parsed
                raise PayloadTooLarge(
                    f"the request carries {len(files)} files; the limit is {self.args.max_files_per_request} "
                    f"(`max_files_per_request`)"
                )
            names, blobs = [f.filename for f in files], [await f.read() for f in files]
        else:  # image/*, application/octet-stream or none (_upload_kinds refused the rest)
            names, blobs = [x_filename], [await request.body()]
        # Priced from the headers before anything reaches the checker (a 5 KB 1-bit PNG can decode to 40 MP).
        await asyncio.to_thread(check_request_pixels, blobs, self.image_limits, self.args.max_request_pixels)
        results = await self._check(blobs, "moderate")
        rows = [
            # An unscorable upload carries the policy's unscorable_action (block by default), never null.
            {"filename": name, **outcome(r["verdict"]), "batch_size": r["batch_size"]}
            for name, r in zip(names, results, strict=True)
        ]
        if all(row["error"] for row in rows):
            detail = listing([f"{row['filename'] or 'body'}: {row['error']}" for row in rows])
            raise ImageDecodeError(f"no uploaded file could be decoded: {detail}")
        log.info("request %s: moderated %d file(s), %d flagged", rid, len(rows), sum(r["nsfw"] for r in rows))
        return {"request_id": rid, "results": rows, "fingerprint": results[0]["fingerprint"]}

    @api.get(
        "/healthz",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "a deployment has no running replica"}},
    )
    async def healthz(self) -> JSONResponse:
        """200 when every deployment has a running replica (the Serve controller's state, cached for a second: never
        a call that queues behind renders); 503 otherwise. Open without an API key."""
        names = {"checker": self.checker.deployment_name}
        if self.generator is not None:
            names["generator"] = self.generator.deployment_name
        status = await self.state.ready(names)
        ready = all(v == "ready" for v in status.values())
        return JSONResponse({"ready": ready, "deployments": status}, status_code=200 if ready else 503)

    async def _generator_info(self) -> dict[str, Any] | None:
        if self.generator is not None and self.generator_info is None:
            self.generator_info = await self._call(
                self.generator.info.remote(), self.args.health_timeout_s, "generator"
            )
        return self.generator_info

    @api.get(
        "/v1/info",
        dependencies=[Depends(_authorize)],
        response_model=InfoResponse,
        responses=error_responses(400, 401, 403, 503),
    )
    async def info(self) -> dict[str, Any]:
        """Models, fingerprints, thresholds, detectors, batching and autoscaling settings, and which parts run demo
        weights (meaningless scores) and which real ones."""
        from pipeline.moderate import weight_parts

        checker = await self._call(self.checker.info.remote(), self.args.health_timeout_s, "checker")
        generator = await self._generator_info()
        demo = checker["demo_weights"] or bool(generator and generator["demo_weights"])
        parts = weight_parts(generator, checker)
        note = f"demo weights in {', '.join(parts['demo'])}: their scores are meaningless" if parts["demo"] else None
        return {
            "checker": checker,
            "generator": generator,
            "demo_weights": demo,
            **parts,
            "detectors": checker.get("detectors", []),
            "note": note,
            "policy": checker.get("policy"),
            "limits": self.limits.__dict__,
            "request_limits": {
                "max_body_bytes": self.args.max_body_bytes,
                "max_files_per_request": self.args.max_files_per_request,
                "max_request_pixels": self.args.max_request_pixels,
                "max_image_pixels": self.image_limits.max_pixels,
            },
            "auth": self.auth,
            "deployments": await self.state.settings(),
        }
