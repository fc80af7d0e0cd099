"""The HTTP front (FastAPI via ``@serve.ingress``): validation, auth, limits, and translation to and from the core.

No scoring or policy logic lives here: images go to the checker deployment, verdicts and images go through the
core's ``pipeline.moderate.moderate``, and only what that releases is PNG-encoded. Any failure before a verdict
exists is a 503 with no image bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import os
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Histogram

from pipeline.errors import DiffguardError, ImageDecodeError, InvalidInput, PayloadTooLarge, Unavailable

from .settings import IngressArgs

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="diffguard",
    description="Moderated text-to-image generation and image moderation. Every image that leaves was scored by "
    "the safety checker in the same request.",
    version="0.1.0",
)


class Unauthorized(DiffguardError):
    status_code = 401


class UnsupportedMediaType(DiffguardError):
    status_code = 415


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


@api.exception_handler(DiffguardError)
async def _diffguard_error(request: Request, exc: DiffguardError) -> JSONResponse:
    retry = request.app.state.retry_after_s if exc.status_code == 503 else None
    message = getattr(exc, "message", None) or str(exc)  # errors re-raised from another replica keep only str()
    return _error(exc.status_code, message, _request_id(request), retry)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = _request_id(request)
    log.error("request %s failed: %r", rid, exc, exc_info=exc)
    return _error(500, "internal error; quote the request id when reporting it", rid)


def _authorize(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("missing or wrong API key: send `Authorization: Bearer <key>`")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _png_base64(image: Any) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _deployment_settings() -> dict[str, Any]:
    """Each deployment's live settings (replicas, autoscaling, user_config) as the Serve controller reports them."""
    try:
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        app = serve.get_replica_context().app_name
        deployments = details["applications"][app]["deployments"]
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"error": f"unavailable ({type(exc).__name__})"}
    keep = ("max_ongoing_requests", "max_queued_requests", "autoscaling_config", "user_config", "num_replicas")
    return {
        name: {
            "status": d.get("status"),
            "replicas": len(d.get("replicas", [])),
            **{k: d.get("deployment_config", {}).get(k) for k in keep},
        }
        for name, d in deployments.items()
    }


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
        self, checker: DeploymentHandle, generator: DeploymentHandle | None, args: dict[str, Any] | None = None
    ):
        from pipeline.requests import GenerationLimits

        self.args = IngressArgs(**(args or {}))
        self.checker, self.generator = checker, generator
        self.limits = GenerationLimits(**self.args.limits)
        api.state.api_key = self.args.api_key if self.args.api_key is not None else os.environ.get("DIFFGUARD_API_KEY")
        api.state.retry_after_s = self.args.retry_after_s
        self.latency = Histogram(
            "diffguard_moderation_latency_s",
            description="time from receiving images to their verdicts",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("route",),
        )

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

    @api.post("/v1/generate", dependencies=[Depends(_authorize)])
    async def generate(self, request: Request) -> JSONResponse:
        """Generate images from a JSON body of request fields; flagged images are handled by the policy."""
        from pipeline.moderate import model_info, moderate
        from pipeline.requests import GenerationRequest

        rid = _request_id(request)
        if self.generator is None:
            raise Unavailable("this deployment serves moderation only (no generator configured)")
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind not in ("application/json", ""):
            raise UnsupportedMediaType(f"/v1/generate takes application/json, got {kind!r}")
        body = await _read_body(request, self.args.max_body_bytes)
        try:
            import json

            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the body is not valid JSON ({exc})") from None
        parsed = GenerationRequest.parse(data, self.limits)
        log.info(
            "request %s: generate %d image(s), %d steps, safety=%s", rid, parsed.num_images, parsed.steps, parsed.safety
        )
        rendering = await self._call(
            self.generator.render.remote(parsed.model_dump()), self.args.generator_timeout_s, "generator"
        )
        images = rendering["images"]
        results = await self._check(images, "generate")
        moderated = moderate(images, [r["verdict"] for r in results])
        checker_info = await self._call(self.checker.info.remote(), self.args.health_timeout_s, "checker")
        models = model_info(rendering["info"], checker_info)  # the generator replica that rendered these images
        models["checker_fingerprint"] = results[0]["fingerprint"]  # the policy that scored these very images
        out = []
        for m, r in zip(moderated, results, strict=True):
            out.append(
                {
                    "index": m.index,
                    "nsfw": m.nsfw,
                    "action": m.action,
                    "flagged_categories": m.verdict.flagged_categories,
                    "image_png_base64": _png_base64(m.image) if m.image is not None else None,
                    "moderation": {**m.verdict.to_dict(), "batch_size": r["batch_size"]},
                }
            )
        log.info("request %s: %s", rid, [m.action for m in moderated])
        return JSONResponse(
            {
                "request_id": rid,
                "seed": rendering["seed"],
                "width": rendering["width"],
                "height": rendering["height"],
                "warnings": rendering["warnings"],
                "images": out,
                "models": models,
            },
        )

    @api.post("/v1/moderate", dependencies=[Depends(_authorize)])
    async def moderate_uploads(self, request: Request) -> JSONResponse:
        """Score uploaded images: multipart with one or more `files`, or one raw image body."""
        rid = _request_id(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request, self.args.max_body_bytes)
        if kind == "multipart/form-data":
            names, blobs = await self._multipart(request, body)
        elif kind.startswith("image/") or kind in ("application/octet-stream", ""):
            names, blobs = [request.headers.get("x-filename")], [body]
        else:
            raise UnsupportedMediaType(
                f"/v1/moderate takes multipart/form-data (field `files`), image/* or application/octet-stream; "
                f"got {kind!r}"
            )
        results = await self._check(blobs, "moderate")
        rows = [
            {"filename": name, **r["verdict"].to_dict(), "batch_size": r["batch_size"]}
            for name, r in zip(names, results, strict=True)
        ]
        if all(row["error"] for row in rows):
            detail = "; ".join(f"{row['filename'] or 'body'}: {row['error']}" for row in rows)
            raise ImageDecodeError(f"no uploaded file could be decoded: {detail}")
        log.info("request %s: moderated %d file(s), %d flagged", rid, len(rows), sum(r["nsfw"] for r in rows))
        return JSONResponse(
            {"request_id": rid, "results": rows, "fingerprint": results[0]["fingerprint"]},
        )

    @staticmethod
    async def _multipart(request: Request, body: bytes) -> tuple[list[str | None], list[bytes]]:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1024)
        except Exception as exc:  # noqa: BLE001 - starlette raises several types for malformed bodies
            raise ImageDecodeError(f"malformed multipart body: {exc}") from None
        files = [f for f in form.getlist("files") if hasattr(f, "read")]
        if not files:
            raise InvalidInput(f"multipart body has no `files` field with a file; fields: {sorted(form.keys())}")
        blobs = [await f.read() for f in files]
        return [f.filename for f in files], blobs

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 only when every deployment answers; open without an API key."""
        status = {"checker": await self._ready(self.checker)}
        if self.generator is not None:
            status["generator"] = await self._ready(self.generator)
        ready = all(v == "ready" for v in status.values())
        return JSONResponse({"ready": ready, "deployments": status}, status_code=200 if ready else 503)

    async def _ready(self, handle: DeploymentHandle) -> str:
        try:
            await self._call(handle.info.remote(), self.args.health_timeout_s, "deployment")
            return "ready"
        except DiffguardError as exc:
            return f"unavailable: {exc.message}"

    @api.get("/v1/info", dependencies=[Depends(_authorize)])
    async def info(self) -> JSONResponse:
        """Models, fingerprints, thresholds, batching and autoscaling settings, and whether demo weights are in use."""
        checker = await self._call(self.checker.info.remote(), self.args.health_timeout_s, "checker")
        generator = None
        if self.generator is not None:
            generator = await self._call(self.generator.info.remote(), self.args.health_timeout_s, "generator")
        demo = checker["demo_weights"] or bool(generator and generator["demo_weights"])
        return JSONResponse(
            {
                "checker": checker,
                "generator": generator,
                "demo_weights": demo,
                "note": "tiny demo weights: verdicts are meaningless" if demo else None,
                "policy": checker.get("policy"),
                "limits": self.limits.__dict__,
                "deployments": _deployment_settings(),
            }
        )
