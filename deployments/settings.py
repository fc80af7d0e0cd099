"""Typed settings for the Serve app: builder arguments and each deployment's live ``user_config``.

Pydantic and the core's torch-free :class:`~pipeline.spec.CheckerSpec`; importing this module never touches torch or
model weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.spec import CheckerSpec

SPEC = CheckerSpec()  # the core's defaults, which the checker's settings take
# Checker batches in flight per replica (``@serve.batch(max_concurrent_batches=...)``), fixed: one batch decodes into
# views in a worker thread while the other is in the vision pass. A replica's max_ongoing_requests must be at least
# max_batch_size x this, or batches never fill.
MAX_CONCURRENT_BATCHES = 2


class CheckerRuntime(BaseModel):
    """The checker's ``user_config``: applied by ``reconfigure()`` without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    # objects per @serve.batch batch, from any requests (/v1/info checker.batching.max_batch_size); not the core's
    # views per vision pass (checker.views_per_model_call)
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)  # how long a partial batch waits for more images
    adjustment: float = Field(SPEC.adjustment, ge=-1, le=1)  # stricter filter when > 0
    thresholds: dict[str, float] = Field(default_factory=dict)  # concept name or index -> threshold override
    concepts: str | None = None  # a saved concept set (custom concepts + overrides) readable by every replica
    policy: str | None = SPEC.policy  # policy file readable by every replica, or default | stock | block | blur | black
    # None: a policy whose text concepts cannot be encoded fails the replica at start (DEPLOY_FAILED, with the fix);
    # "stock": opt in to falling back to the stock concepts, loudly (warning, and info()["policy_fallback"])
    policy_fallback: Literal["stock"] | None = None
    # named policies a keys file's `policy:` may name (name -> policy file or keyword), held by every replica beside
    # `policy` (the service's own, for the single DIFFGUARD_API_KEY and keys that name none); one batch scores them all
    policies: dict[str, str] = Field(default_factory=dict)


class CheckerArgs(BaseModel):
    """How checker replicas load their model (fixed for a replica's life): the load-time fields of the core's
    :class:`~pipeline.spec.CheckerSpec`, with its defaults, plus the replica's threads and an optional factory."""

    model_config = ConfigDict(extra="forbid")

    model: str = SPEC.model  # hub id, local directory or "tiny"
    device: str = SPEC.device  # auto | cpu | cuda
    dtype: str = SPEC.dtype  # auto | float32 | bfloat16 | float16
    max_pixels: int = Field(SPEC.max_pixels, ge=1)  # decompression-bomb limit for uploads
    max_object_bytes: int = Field(SPEC.max_object_bytes, ge=1)  # encoded size above which an image is unscorable
    max_views: int = Field(SPEC.max_views, ge=1, le=4096)  # views scored per object (frames, pages, tiles)
    max_decoded_pixels: int = Field(SPEC.max_decoded_pixels, ge=1)  # every frame decoded for one object, summed
    video_fps: float = Field(SPEC.video_fps, gt=0, le=60)  # video frames sampled per second of display time
    concept_text_model: str | None = SPEC.concept_text_model  # CLIP text tower for text concepts
    threads: int | None = Field(None, ge=1, le=256)  # torch CPU threads (None: Ray's, = the replica's num_cpus)
    factory: str | None = None  # "module:callable" returning a checker (tests inject faults through this)

    def spec(self) -> CheckerSpec:
        """The core's spec for these arguments, without a policy: replicas load first, then ``reconfigure()`` applies
        the policy fields of their user_config (:class:`CheckerRuntime`)."""
        return CheckerSpec(**self.model_dump(exclude={"threads", "factory"}), policy=None)


class GeneratorRuntime(BaseModel):
    """The generator's ``user_config``: cross-request batching, applied by ``reconfigure()`` without a restart."""

    model_config = ConfigDict(extra="forbid")

    max_batch_images: int = Field(8, ge=1, le=256)  # images per pipeline call, across compatible requests (1: off)
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)  # how long the oldest request waits for company


class GeneratorArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"  # Stable Diffusion hub id, local directory or "tiny"
    device: str = "auto"
    dtype: str = "auto"
    text_encoder: str | None = None  # e.g. aimagelab/safeclip_vit-l_14
    factory: str | None = None  # "module:callable" returning a generator


class IngressArgs(BaseModel):
    """The HTTP front: limits and timeouts (the policy lives in the checker's user_config)."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    body_read_timeout_s: float = Field(30.0, gt=0, le=3600)  # a body not all received within this gets 408
    checker_timeout_s: float = Field(30.0, gt=0)  # no verdict within this -> 503, no pixels
    generator_timeout_s: float = Field(600.0, gt=0)
    health_timeout_s: float = Field(5.0, gt=0)
    retry_after_s: int = Field(1, ge=0)  # Retry-After on 503
    limits: dict[str, Any] = Field(default_factory=dict)  # GenerationLimits overrides, e.g. {"max_images": 8}
    max_files_per_request: int = Field(64, ge=1, le=1000)  # /v1/moderate: more files -> 413 (a raw body is 1 file)
    # /v1/moderate: more pixels in all (summed from the image headers, before any decoding) -> 413
    max_request_pixels: int = Field(256_000_000, ge=1)
    # keys come from DIFFGUARD_KEYS_FILE (tenants, reloaded live) or DIFFGUARD_API_KEY in the Ingress replicas'
    # environment; without either, the service starts only on a loopback host (127.0.0.1, ::1, localhost) unless this
    # is true
    allow_unauthenticated: bool = False
    # the audit log: a Delta table of every /v1/generate and /v1/moderate decision (a directory or s3://bucket/prefix;
    # `diffguard serve --audit-dest DEST` sets it); None: no audit log
    audit_dest: str | None = None
    # true: a decision whose audit row cannot be written is answered 503 (nothing released); false: answered anyway,
    # counted in diffguard_audit_failures and logged
    audit_required: bool = True
    # the quota keeper's answer is awaited this long; past it (or with the keeper gone) requests are let through,
    # counted in diffguard_quota_unavailable and logged (quotas fail open: they share capacity, not keep images back)
    quota_timeout_s: float = Field(0.25, gt=0, le=10)
    # zlib level of the PNG a /v1/generate response releases (0-9): 1 costs a 512x512 photo ~3.6x less CPU than
    # Pillow's default 6 for ~13% more bytes (docs/BENCHMARKS.md, "CPU per image outside the model")
    png_compress_level: int = Field(1, ge=0, le=9)
    # quality (1-100) of the jpeg or webp a /v1/generate request may ask for (`image_format`)
    image_quality: int = Field(90, ge=1, le=100)


class AppArgs(BaseModel):
    """Arguments of ``deployments.app:build_app`` (the ``args`` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid")

    checker: CheckerArgs = Field(default_factory=CheckerArgs)
    generator: GeneratorArgs | None = Field(default_factory=GeneratorArgs)  # None: moderation-only service
    ingress: IngressArgs = Field(default_factory=IngressArgs)

    @model_validator(mode="after")
    def _known_factories(self) -> AppArgs:
        for part in (self.checker, self.generator):
            if part is not None and part.factory is not None and ":" not in part.factory:
                raise ValueError(f"factory must be 'module:callable', got {part.factory!r}")
        return self


def import_factory(path: str) -> Any:
    import importlib

    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
