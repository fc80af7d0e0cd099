"""The SafetyChecker deployment: a thin adapter that batches images across requests with ``@serve.batch``."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Histogram

from pipeline.interface import CheckerCore, checker_core

from .settings import MAX_CONCURRENT_BATCHES, CheckerArgs, CheckerRuntime, import_factory

log = logging.getLogger("ray.serve")

BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


@serve.deployment(
    name="SafetyChecker",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,  # >= max_batch_size x MAX_CONCURRENT_BATCHES (16 x 2), or batches never fill
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 16,  # one full batch queued per replica
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
    user_config=CheckerRuntime().model_dump(),
    health_check_period_s=10,
)
class SafetyCheckerDeployment:
    """Holds one core ``SafetyChecker``; each image is one item of the batch queue, whichever request it came from."""

    def __init__(self, args: dict[str, Any] | None = None):
        self.args = CheckerArgs(**(args or {}))
        if self.args.threads:  # a 0.5-CPU replica gets OMP_NUM_THREADS=1 from Ray: half a 2-core machine's matmuls
            import torch

            torch.set_num_threads(self.args.threads)
        # The policy (and its fallback setting) comes with user_config: reconfigure() runs next. A factory (tests'
        # fault injection) returns any object with the core's interface; it takes the same path as the real one.
        self.checker: CheckerCore = checker_core(
            import_factory(self.args.factory)(self.args) if self.args.factory else self.args.spec().load()
        )
        info = self.checker.info()
        # What a response names besides the fingerprint and the demo/real parts (those follow the policy: read per
        # batch); fixed for the replica's life, so it rides on each result and the ingress needs no info() round trip.
        self.identity = {"model": info["model"], "demo_weights": info["demo_weights"]}
        self.runtime = CheckerRuntime()
        self._lock = threading.Lock()  # a batch is scored under one policy; reconfigure waits for it
        self.batch_sizes = Histogram(
            "diffguard_checker_batch_size", description="images per checker batch", boundaries=BATCH_BUCKETS
        )
        self.flagged = Counter(
            "diffguard_images_flagged", description="images flagged, by concept", tag_keys=("concept",)
        )
        self.scored = Counter("diffguard_images_scored", description="images scored by the checker")
        # A batch is decoded into views in a worker thread outside the model lock, so it overlaps the previous
        # batch's vision pass (MAX_CONCURRENT_BATCHES).
        self.split = {"images": 0, "views": 0, "decode_s": 0.0, "preprocess_s": 0.0, "model_s": 0.0}  # since start

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        runtime = CheckerRuntime(**(user_config or {}))
        with self._lock:
            # A policy whose text concepts cannot be encoded raises (the replica fails to start, DEPLOY_FAILED with the
            # core's message saying how to fix it) unless policy_fallback opts in to the stock concepts, loudly.
            previous = getattr(self.checker, "policy_fallback", None)
            if hasattr(self.checker, "policy_fallback"):
                self.checker.policy_fallback = runtime.policy_fallback
            try:
                self.checker.configure(
                    adjustment=runtime.adjustment,
                    thresholds=runtime.thresholds,
                    concepts=runtime.concepts,
                    policy=runtime.policy,
                )
            except Exception:
                if hasattr(self.checker, "policy_fallback"):
                    self.checker.policy_fallback = previous  # configure() is atomic: so is this
                raise
            self.runtime = runtime
        self._score.set_max_batch_size(runtime.max_batch_size)
        self._score.set_batch_wait_timeout_s(runtime.batch_wait_timeout_s)
        log.info("checker reconfigured: fingerprint %s, %s", self.checker.fingerprint, runtime.model_dump())

    def _preprocess_s(self) -> float:
        """Seconds the core has spent preprocessing views (0 for a stand-in that does not count them)."""
        return getattr(self.checker, "preprocess_s", 0.0)

    def _decode(self, items: list[Any]) -> list[Any]:
        """Runs in a worker thread, outside the model lock: objects -> their views or that item's decode error."""
        start = time.perf_counter()
        objects = self.checker.views(items)
        self.split["decode_s"] += time.perf_counter() - start
        return objects

    def _score_sync(self, items: list[Any]) -> list[dict[str, Any]]:
        """Runs in a worker thread. Never raises: a failure becomes every item's ``unavailable`` result."""
        try:
            with self._lock:
                start, preprocess_s = time.perf_counter(), self._preprocess_s()
                verdicts = self.checker.score_views(items)
                elapsed, preprocessing = time.perf_counter() - start, self._preprocess_s() - preprocess_s
                self.split["preprocess_s"] += preprocessing
                self.split["model_s"] += elapsed - preprocessing
                self.split["images"] += len(items)
                self.split["views"] += sum(v.views for v in verdicts)
                fingerprint = self.checker.fingerprint
                # which parts are demo and which real follows the policy (its text concepts, its detectors)
                parts = getattr(self.checker, "parts", {})
        except Exception as exc:  # noqa: BLE001 - the batch must not fail its callers with an exception
            log.exception("checker batch of %d failed", len(items))
            return [{"unavailable": f"checker failed: {type(exc).__name__}"} for _ in items]
        self.batch_sizes.observe(len(items))
        self.scored.inc(len(items))
        for v in verdicts:
            for name in v.bad_concept_names + v.flagged_categories:
                self.flagged.inc(tags={"concept": name})
        checker = {**self.identity, "fingerprint": fingerprint, **parts}
        return [
            {"verdict": v, "batch_size": len(items), "fingerprint": fingerprint, "checker": checker} for v in verdicts
        ]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _score(self, items: list[Any]) -> list[dict[str, Any]]:
        try:  # decoding overlaps the other batch's vision pass; the model lock keeps passes one at a time
            objects = await asyncio.to_thread(self._decode, items)
        except Exception as exc:  # noqa: BLE001 - as in _score_sync: every item's result, never an exception
            log.exception("decoding a checker batch of %d failed", len(items))
            return [{"unavailable": f"checker failed: {type(exc).__name__}"} for _ in items]
        return await asyncio.to_thread(self._score_sync, objects)

    async def check_many(self, images: list[Any]) -> list[dict[str, Any]]:
        """Images (uint8 arrays or encoded bytes) -> results in order; each image joins the shared batch queue."""
        return list(await asyncio.gather(*(self._score(image) for image in images)))

    def info(self) -> dict[str, Any]:
        """The core's info, with two batch sizes told apart: ``batching`` is the cross-request ``@serve.batch``
        (objects per batch, batches in flight); ``views_per_model_call`` the core's chunk of views per vision pass,
        which the core's ``max_batch_size`` field also gives (kept for existing clients: the same figure)."""
        core = self.checker.info()
        batching = self.runtime.model_dump(include={"max_batch_size", "batch_wait_timeout_s"})
        return {
            **core,
            "views_per_model_call": core.get("max_batch_size"),
            "batching": {**batching, "max_concurrent_batches": MAX_CONCURRENT_BATCHES},
            "per_image_ms": self.per_image_ms(),
        }

    def per_image_ms(self) -> dict[str, Any]:
        """Mean milliseconds per object since the replica started: decode into views (overlapped with the vision
        pass), preprocess and model (under the model lock), and the objects and views they average over."""
        n = self.split["images"]
        mean = {
            k.removesuffix("_s"): round(1000 * v / n, 3) if n else None
            for k, v in self.split.items()
            if k not in ("images", "views")
        }
        return {**mean, "images": n, "views": self.split["views"], "decode_overlaps_model": True}

    def check_health(self) -> None:
        pass  # a replica whose model loaded is healthy; failures show up as results, and as 503s at the ingress
