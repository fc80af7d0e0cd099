"""The HTTP API's request and response models: the OpenAPI document that clients, fuzzers and the page rely on.

Pydantic only (no Ray, no torch). ``GenerateRequest`` is the core's ``GenerationRequest``: the same fields, types and
checks, with the ``GenerationLimits`` shown as JSON-schema bounds (:func:`schema_with_limits` rewrites them for the
limits a deployment configures). Every error, whatever its status, is one :class:`ErrorResponse`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.requests import MAX_SEED, GenerationLimits, GenerationRequest

Action = Literal["allow", "flag", "blur", "black", "block"]


def _bounds(limits: GenerationLimits) -> dict[str, dict[str, Any]]:
    """JSON-schema keywords per field for these limits (what ``GenerationRequest.check`` enforces)."""
    size = {"minimum": limits.min_size, "maximum": limits.max_size, "multipleOf": limits.size_multiple}
    return {
        "prompt": {"minLength": 1, "maxLength": limits.max_prompt_chars},
        "negative_prompt": {"maxLength": limits.max_prompt_chars},
        "num_images": {"minimum": 1, "maximum": limits.max_images},
        "steps": {"minimum": limits.min_steps, "maximum": limits.max_steps},
        "guidance_scale": {"minimum": limits.min_guidance, "maximum": limits.max_guidance},
        "width": size,
        "height": size,
        "seed": {"minimum": 0, "maximum": MAX_SEED},
    }


def _apply_bounds(schema: dict[str, Any], limits: GenerationLimits) -> None:
    for name, keywords in _bounds(limits).items():
        prop = schema.get("properties", {}).get(name)
        if prop is None:
            continue
        # `int | None` is anyOf [{type: integer}, {type: null}]: the bounds belong to the non-null branch
        targets = [b for b in prop.get("anyOf", [prop]) if b.get("type") in ("integer", "number", "string")]
        for target in targets:
            target.update(keywords)


ImageFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class GenerateRequest(GenerationRequest):
    """``POST /v1/generate``'s JSON body: the core's ``GenerationRequest`` (unknown fields are refused) and how the
    released images are encoded."""

    image_format: ImageFormat = Field(
        "png",
        description="how each released image is encoded: png (lossless, in `image_png_base64`), or jpeg or webp "
        "(lossy at the service's `image_quality`, in `image_base64`); jpeg costs the service ~15x less CPU than png",
    )

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="GenerateRequest",
        json_schema_extra=lambda schema, _: _apply_bounds(schema, GenerationLimits()),
        json_schema_mode_override="validation",
    )


def schema_with_limits(openapi: dict[str, Any], limits: GenerationLimits, max_files: int) -> dict[str, Any]:
    """The app's OpenAPI document with this deployment's limits: ``GenerateRequest``'s bounds and the most files
    ``/v1/moderate`` takes (its multipart body requires ``files``)."""
    components = openapi.get("components", {}).get("schemas", {})
    if "GenerateRequest" in components:
        _apply_bounds(components["GenerateRequest"], limits)
    multipart = (
        openapi.get("paths", {})
        .get("/v1/moderate", {})
        .get("post", {})
        .get("requestBody", {})
        .get("content", {})
        .get("multipart/form-data", {})
        .get("schema", {})
    )
    ref = multipart.get("$ref", "").rpartition("/")[2]
    if ref in components:
        body = components[ref]
        body["required"] = ["files"]
        files = body["properties"]["files"]
        array = next((b for b in files.get("anyOf", [files]) if b.get("type") == "array"), files)
        keep = {k: v for k, v in files.items() if k in ("title", "description")}
        body["properties"]["files"] = {**array, **keep, "minItems": 1, "maxItems": max_files}
    return openapi


class ErrorResponse(BaseModel):
    """Every error: what went wrong, worded for the client (fields, values and allowed ranges), and the request id."""

    error: str = Field(description="what went wrong and what is allowed; at most 10 problems are listed")
    request_id: str = Field(description="Serve's request id (also the X-Request-ID header): quote it when reporting")


class Moderation(BaseModel):
    """One image's verdict (the core's ``Verdict``) with the action taken and the checker batch that scored it."""

    nsfw: bool = Field(description="a stock concept's margin is > 0")
    concept_scores: list[float] = Field(description="margin per concept (cosine - threshold + adjustment); > 0 hits")
    special_scores: list[float] = Field(description="margin per special-care concept")
    detector_scores: dict[str, dict[str, float]] = Field(
        description='detector -> output -> probability in [0, 1] (4 decimals), e.g. `{"open_nsfw": {"nsfw": '
        "0.93}}`; a policy's detector row turns one into a category margin (probability - threshold + adjustment)"
    )
    bad_concepts: list[int] = Field(description="indices into concept_scores with a margin > 0")
    bad_concept_names: list[str]
    special_care: bool
    categories: dict[str, float] = Field(description="policy category -> its highest concept margin (> 0 flags it)")
    flagged_categories: list[str] = Field(description="categories with a margin > 0")
    action: Action = Field(description="what the policy did with the image")
    error: str | None = Field(description="why the image could not be scored (then `unscorable`)")
    truncated: bool = Field(description="scored on what decodes of a truncated file")
    unscorable: bool = Field(description="read but not scorable; `action` is the policy's unscorable_action")
    views: int = Field(description="views scored: frames, pages, backgrounds under the alpha, tiles past the crop")
    views_total: int = Field(description="views the object has; more than `views` when `views_sampled`")
    views_sampled: bool = Field(description="more views than max_views: frames sampled evenly over display time")
    view: str | None = Field(
        description="the view that decided, e.g. `frame 12 @ 1.50 s`, `page 2`, `over white`, `tile 3/3`; null when "
        "the image itself is the only view"
    )
    demo: list[str] = Field(
        description="parts of this verdict scored with demo weights (tiny, random): their scores are meaningless, "
        "e.g. `stock checker`, `text concepts`, a detector's name"
    )
    real: list[str] = Field(description="parts of this verdict scored with real, trained weights, e.g. `open_nsfw`")
    batch_size: int = Field(description="images in the checker batch that scored this one (across requests)")


class GeneratedImage(BaseModel):
    index: int
    nsfw: bool
    action: Action
    flagged_categories: list[str]
    image_png_base64: str | None = Field(
        description="the PNG the policy releases (blurred or black if so); null when blocked, or when the request "
        "asked for another `image_format`"
    )
    image_base64: str | None = Field(
        None, description="the released image when the request asked for jpeg or webp; null when blocked or png"
    )
    media_type: str | None = Field(
        None, description="the released image's type (image/png, image/jpeg, image/webp); null when blocked"
    )
    moderation: Moderation


class ModelsUsed(BaseModel):
    generator: str
    generator_fingerprint: str
    text_encoder: str | None
    checker: str
    checker_fingerprint: str = Field(description="the policy that scored these very images")
    demo_weights: bool = Field(description="tiny demo weights in the generator or the checker (see `demo`)")
    demo: list[str] = Field(description="parts with demo weights (meaningless): the checker's, then `generator`")
    real: list[str] = Field(description="parts with real, trained weights: the checker's, then `generator`")


class GenerateResponse(BaseModel):
    request_id: str
    seed: int = Field(description="the seed that reproduces these images (same device and dtype)")
    width: int
    height: int
    warnings: list[str]
    generator_batch_size: int = Field(
        description="images rendered in the same pipeline call as these (compatible requests batched across clients)"
    )
    images: list[GeneratedImage]
    models: ModelsUsed
    tenant: str = Field(description="the caller's tenant (its key's, in the keys file)")
    policy: str | None = Field(description="the named policy these images were moderated with; null: the service's own")


class ModerationResult(Moderation):
    """One uploaded file's row; an undecodable file has ``error`` and ``unscorable`` set."""

    filename: str | None = Field(description="the multipart filename, or X-Filename for a raw body")


class ModerateResponse(BaseModel):
    request_id: str
    fingerprint: str = Field(description="the checker policy that scored these files")
    results: list[ModerationResult] = Field(description="one row per file, in the order sent")
    tenant: str = Field(description="the caller's tenant (its key's, in the keys file)")
    policy: str | None = Field(description="the named policy these files were moderated with; null: the service's own")


class HealthResponse(BaseModel):
    ready: bool = Field(description="every deployment has a running replica")
    deployments: dict[str, str] = Field(description='label -> "ready" or "unavailable: <why>"')


class RequestLimits(BaseModel):
    max_body_bytes: int
    max_files_per_request: int
    max_request_pixels: int
    max_image_pixels: int


class AuthInfo(BaseModel):
    required: bool = Field(description="`Authorization: Bearer <key>` is needed on every /v1 route")
    allow_unauthenticated: bool
    host: str | None
    keys: str = Field("none", description="where keys come from: `keys_file` (tenants), `api_key` or `none`")


class CallerInfo(BaseModel):
    """The caller's own key: never another tenant's."""

    key_id: str = Field(description="the key's id in the keys file (`api-key` for DIFFGUARD_API_KEY)")
    tenant: str
    policy: str | None = Field(description="the named policy its images are moderated with; null: the service's own")
    routes: list[str] = Field(description="the decision routes it may call (/v1/info is open to every key)")
    limits: dict[str, float] | None = Field(description="requests_per_s, burst, images_per_min; null: unlimited")


class AuditInfo(BaseModel):
    enabled: bool = Field(description="every decision is recorded before it is answered (`audit_dest`)")
    required: bool = Field(description="a decision whose row cannot be written is answered 503")


class Limits(BaseModel):
    """The ``GenerationLimits`` this deployment validates requests against."""

    max_prompt_chars: int
    max_images: int
    min_steps: int
    max_steps: int
    min_guidance: float
    max_guidance: float
    min_size: int
    max_size: int
    size_multiple: int


class DetectorInfo(BaseModel):
    """A trained image classifier the checker's policy reads (``detector_scores`` in every verdict)."""

    name: str = Field(description="the reference policies use: `open_nsfw`, a hub id, `ID@REVISION` or a directory")
    source: str = Field(description="where the weights were read from")
    revision: str | None = Field(description="the package version or hub revision of the weights, when known")
    sha256: str = Field(
        description="sha256 of the weights (a Hugging Face classifier's: of its weights and its preprocessing config); "
        "part of the checker's fingerprint"
    )
    licence: str = Field(description="the weights' licence terms")
    outputs: list[str] = Field(description="the probabilities it produces (the keys of `detector_scores[name]`)")
    runtime: str = Field(description="what runs it: `onnxruntime` or `torch`")
    device: str
    demo: bool = Field(description="tiny demo weights: its scores are meaningless")


class InfoResponse(BaseModel):
    checker: dict[str, Any] = Field(description="model, fingerprint, concepts and thresholds, policy, batching")
    generator: dict[str, Any] | None = Field(description="model and fingerprint; null for a moderation-only service")
    demo_weights: bool = Field(description="the generator or the checker runs tiny demo weights (see `demo`)")
    demo: list[str] = Field(
        description="parts of this service with demo weights, whose scores are meaningless: `stock checker`, "
        "`text concepts`, a detector's name, `generator`"
    )
    real: list[str] = Field(description="parts with real, trained weights, e.g. `open_nsfw`")
    detectors: list[DetectorInfo] = Field(description="the detectors the checker's policy reads")
    note: str | None
    policy: dict[str, Any] | None
    limits: Limits
    request_limits: RequestLimits
    auth: AuthInfo
    caller: CallerInfo
    audit: AuditInfo
    deployments: dict[str, Any] = Field(description="each deployment's status, replicas, autoscaling, user_config")


STATUS_WHEN = {
    400: "an upload could not be decoded (every file; names them), a malformed multipart body, or a duplicate "
    "Content-Type, Content-Length or Authorization header",
    401: "API key missing or wrong (`Authorization: Bearer <key>`)",
    403: "a key calling a route outside its `routes:`, or a keyless service refusing a cross-site browser request "
    "(Sec-Fetch-Site, Origin)",
    408: "the request body did not arrive within body_read_timeout_s",
    413: "body over max_body_bytes; more files than max_files_per_request or more pixels than max_request_pixels",
    415: "wrong content type",
    422: "invalid JSON or parameters (names the field, the value and the allowed range); JSON nested too deeply",
    429: "the key is over its quota (requests_per_s with its burst, or images_per_min): retry after Retry-After",
    503: "checker or generator unavailable, failing or too slow, or overload: nothing was released; retry later",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the one error schema (503 with its Retry-After header)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": STATUS_WHEN[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER
    return out


# /v1/moderate's alternative to multipart: one raw image body (FastAPI adds the multipart form itself)
RAW_IMAGE_BODY = {
    "requestBody": {
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
        "description": "multipart/form-data with one or more `files`, or one raw image body (filename from X-Filename)",
    }
}
