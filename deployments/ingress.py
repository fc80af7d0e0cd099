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
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, File, Header, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.errors import (
    DiffguardError,
    ImageDecodeError,
    InvalidInput,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
)
from pipeline.headers import PAGE_HEADERS
from pipeline.images import DecodeLimits

from .api import api, authorize, request_id
from .audit import Auditor, image_row, sha256
from .auth import auth_info
from .edge import EdgeSettings, json_only, upload_kinds
from .health import ReplicaState, http_host
from .metrics import IngressMetrics
from .quota import QuotaClient
from .schemas import (
    MEDIA_TYPES,
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
from .tenancy import ANONYMOUS, Callers, caller_info, check_start, decision_route
from .uploads import check_request_pixels, listing

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"


def _encode(image: Any, fmt: str, args: IngressArgs) -> bytes:
    """A released image (uint8 RGB) as the request's ``image_format``: PNG at ``png_compress_level``, or JPEG / WebP
    at ``image_quality``. Runs in a worker thread: a 512x512 PNG at level 1 is ~30 ms of CPU, a JPEG ~2 ms."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=args.png_compress_level)
    else:
        Image.fromarray(image).save(buf, format=fmt.upper(), quality=args.image_quality)
    return buf.getvalue()


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
        quota: DeploymentHandle | None = None,
    ):
        from pipeline.requests import GenerationLimits

        self.args = IngressArgs(**(args or {}))
        self.checker, self.generator = checker, generator
        self.limits = GenerationLimits(**self.args.limits)
        self.image_limits = image_limits or DecodeLimits()  # the checker's: the edge prices uploads in its views
        self.host = http_host()
        self.metrics = IngressMetrics()  # decision requests, their latency, audit and keys failures
        # DIFFGUARD_KEYS_FILE (tenants, reloaded live), DIFFGUARD_API_KEY, or none: a malformed file, an empty key or
        # both set refuse to start, as does no key on a host others can reach (DEPLOY_FAILED, with why)
        self.callers = Callers.from_environ(os.environ, on_reload=self._keys_reloaded)
        check_start(self.callers, self.host, self.args.allow_unauthenticated)
        self.callers.start()
        self.auth = {**auth_info(None, self.args.allow_unauthenticated, self.host), "required": self.callers.required}
        self.auth["keys"] = self.callers.kind
        self.quota = QuotaClient(quota, self.args.quota_timeout_s) if quota is not None else None
        self._declare_tenants()
        api.state.edge = EdgeSettings(
            None,
            self.args.max_body_bytes,
            self.args.max_files_per_request,
            self.args.body_read_timeout_s,
            callers=self.callers,
            quota=self.quota,
        )
        context = serve.get_replica_context()
        self.auditor = Auditor(
            self.args.audit_dest,
            required=self.args.audit_required,
            replica=context.replica_tag,
            on_failure=lambda route: self.metrics.audit_failures.inc(tags={"route": route}),
        )
        api.state.on_error = self._failed
        api.state.limits = self.limits
        api.state.retry_after_s = self.args.retry_after_s
        api.openapi_schema = None
        api.openapi = self._openapi  # this deployment's limits as the schema's bounds
        self.state = ReplicaState(context.app_name, self.args.health_timeout_s)
        self.generator_info: dict[str, Any] | None = None  # static per replica: fetched once, never behind renders

    def _keys_reloaded(self, error: str | None) -> None:
        if error is not None:
            self.metrics.keys_failures.inc()
        else:
            try:  # on the keys poller's thread: a failure here must not stop the reloads
                self._declare_tenants()
            except Exception:  # noqa: BLE001
                log.exception("declaring the tenants' series after a keys reload failed")

    def _declare_tenants(self) -> None:
        """Every tenant's alerted series at 0 from the start (deployments.metrics.declare)."""
        ring = self.callers.ring
        tenants = {key.tenant for key in ring.keys} if ring is not None else {ANONYMOUS.tenant}
        self.metrics.tenants(tenants)
        if self.quota is not None:
            self.quota.declare(tenants)

    def _failed(self, request: Request, status: int, message: str) -> None:
        """The API's error hook: count the refused or failed decision request and record it in the audit log."""
        route = decision_route(request.url.path)
        if route is None:
            return
        self.metrics.requests.inc(tags={"route": route, "tenant": request.state.caller.tenant, "status": str(status)})
        self.auditor.failure(request, route, status, message)

    async def _images_quota(self, request: Request, images: int) -> None:
        """Spend the caller's images_per_min (generated or uploaded); over it: 429 with Retry-After."""
        if self.quota is None:
            return
        caller = request.state.caller
        decision = await self.quota.take(caller.id, caller.limits, requests=0, images=images, tenant=caller.tenant)
        if decision is not None and decision.too_large:  # more images than the key may ever take at once
            raise InvalidInput(decision.reason)
        if decision is not None and not decision.allowed:
            raise TooManyRequests(decision.reason, decision.retry_after_s)

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

    async def _check(self, images: list[Any], route: str, caller: Any) -> list[dict[str, Any]]:
        """Each image joins the checker's shared batch queue, scored with the caller's policy."""
        start = time.perf_counter()
        call = self.checker.check_many.remote(images, policy=caller.policy, tenant=caller.tenant)
        results = await self._call(call, self.args.checker_timeout_s, "checker")
        if len(results) != len(images) or any("unavailable" in r for r in results):
            reason = next((r["unavailable"] for r in results if "unavailable" in r), "wrong number of results")
            raise Unavailable(f"the checker could not score the images ({reason}); nothing was released")
        self.metrics.latency.observe(time.perf_counter() - start, tags={"route": route, "tenant": caller.tenant})
        return results

    async def _answered(self, request: Request, route: str, response: dict[str, Any], **row: Any) -> dict[str, Any]:
        """The response, once its audit row is durable (503 without pixels when it cannot be, unless configured)."""
        caller = request.state.caller
        await self.auditor.decision(request, route, 200, **row)
        self.metrics.requests.inc(tags={"route": route, "tenant": caller.tenant, "status": "200"})
        response["tenant"], response["policy"] = caller.tenant, caller.policy
        return response

    @api.get("/", include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        """The page: plain HTML, CSS and JavaScript from the package, driving this API (no CDN, works offline)."""
        base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
        text = (STATIC / "index.html").read_text().replace("{{base}}", base)
        return HTMLResponse(text, headers=PAGE_HEADERS)

    @api.post(
        "/v1/generate",
        dependencies=[Depends(authorize), Depends(json_only)],
        response_model=GenerateResponse,
        responses=error_responses(400, 401, 403, 408, 413, 415, 422, 429, 503),
    )
    async def generate(self, request: Request, body: GenerateRequest) -> dict[str, Any]:
        """Generate images from a prompt. Every image is scored by the checker in this request and the policy
        decides what leaves: allowed and flagged images as they are, blurred or black ones as such, blocked ones not
        at all (`image_png_base64` is null). No verdict, no pixels: a 503."""
        from pipeline.moderate import model_info, moderate

        rid, caller = request_id(request), request.state.caller
        if self.generator is None:
            raise Unavailable("this deployment serves moderation only (no generator configured)")
        body.check(self.limits)  # this deployment's limits (the schema shows them); InvalidInput names each field
        await self._images_quota(request, body.num_images)
        log.info("request %s: generate %d image(s), %d steps, safety=%s", rid, body.num_images, body.steps, body.safety)
        rendering = await self._call(
            self.generator.render.remote(body.model_dump(exclude={"image_format"})),
            self.args.generator_timeout_s,
            "generator",
        )
        images = rendering["images"]
        self.generator_info = self.generator_info or rendering["info"]
        results = await self._check(images, "generate", caller)
        moderated = moderate(images, [r["verdict"] for r in results])
        models = model_info(rendering["info"], results[0]["checker"])  # the replicas that rendered and scored these
        models["checker_fingerprint"] = results[0]["fingerprint"]  # the policy that scored these very images
        out, audited = [], []
        for m, r in zip(moderated, results, strict=True):
            row = m.report()  # the core's one shape for a moderated image
            row["moderation"].update(action=m.action, batch_size=r["batch_size"])
            fmt = body.image_format
            data = await asyncio.to_thread(_encode, m.image, fmt, self.args) if m.image is not None else None
            encoded = base64.b64encode(data).decode() if data is not None else None
            row["image_png_base64"] = encoded if fmt == "png" else None
            row["image_base64"] = encoded if fmt != "png" else None
            row["media_type"] = MEDIA_TYPES[fmt] if data is not None else None
            out.append(row)
            audited.append(image_row(row["moderation"], m.action, sha256(data) if data is not None else None))
        log.info("request %s: %s", rid, [m.action for m in moderated])
        generation = self.auditor.generation(request, body.model_dump(), rendering["seed"])
        response = {
            "request_id": rid,
            "seed": rendering["seed"],
            "width": rendering["width"],
            "height": rendering["height"],
            "warnings": rendering["warnings"],
            "generator_batch_size": rendering.get("batch_size", 1),
            "images": out,
            "models": models,
        }
        fields = {"images": audited, "policy_fingerprint": models["checker_fingerprint"], **generation}
        return await self._answered(request, "generate", response, models=json.dumps(models, default=str), **fields)

    @api.post(
        "/v1/moderate",
        dependencies=[Depends(authorize), Depends(upload_kinds)],
        response_model=ModerateResponse,
        responses=error_responses(400, 401, 403, 408, 413, 415, 422, 429, 503),
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

        rid, caller = request_id(request), request.state.caller
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
        await self._images_quota(request, len(blobs))
        results = await self._check(blobs, "moderate", caller)
        rows = [
            # An unscorable upload carries the policy's unscorable_action (block by default), never null.
            {"filename": name, **outcome(r["verdict"]), "batch_size": r["batch_size"]}
            for name, r in zip(names, results, strict=True)
        ]
        if all(row["error"] for row in rows):
            detail = listing([f"{row['filename'] or 'body'}: {row['error']}" for row in rows])
            raise ImageDecodeError(f"no uploaded file could be decoded: {detail}")
        # DEBUG: Serve's access log already has a line per request, the audit log each decision; a second INFO line
        # cost ~6% of the Ingress replica's CPU per upload (docs/BENCHMARKS.md, "CPU per image outside the model")
        log.debug("request %s: moderated %d file(s), %d flagged", rid, len(rows), sum(r["nsfw"] for r in rows))
        response = {"request_id": rid, "results": rows, "fingerprint": results[0]["fingerprint"]}
        digests = (
            await asyncio.to_thread(lambda: [sha256(b) for b in blobs]) if self.auditor.log else [None] * len(rows)
        )
        audited = [
            image_row(row, row["action"], digest, row["filename"]) for row, digest in zip(rows, digests, strict=True)
        ]
        models = json.dumps({"checker": results[0]["checker"]}, default=str)
        fields = {"images": audited, "policy_fingerprint": results[0]["fingerprint"], "models": models}
        return await self._answered(request, "moderate", response, **fields)

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
        dependencies=[Depends(authorize)],
        response_model=InfoResponse,
        responses=error_responses(400, 401, 403, 503),
    )
    async def info(self, request: Request) -> dict[str, Any]:
        """Models, fingerprints, thresholds, detectors, batching and autoscaling settings, which parts run demo
        weights (meaningless scores) and which real ones, and the caller's own tenant, policy, routes and limits
        (never another tenant's)."""
        from pipeline.moderate import weight_parts

        caller = request.state.caller
        call = self.checker.info.remote(policy=caller.policy)
        checker = await self._call(call, self.args.health_timeout_s, "checker")
        checker.pop("policies", None)  # the service's policy names: not this caller's business
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
            "caller": caller_info(caller),
            "audit": {"enabled": self.auditor.log is not None, "required": self.args.audit_required},
            "deployments": await self.state.settings(),
        }
