"""The SafetyChecker deployment: a thin adapter that batches images across requests with ``@serve.batch``."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, NamedTuple

from ray import serve

from pipeline.errors import InvalidInput
from pipeline.interface import CheckerCore, checker_core, policy_core

from .metrics import CheckerMetrics
from .settings import MAX_CONCURRENT_BATCHES, CheckerArgs, CheckerRuntime, import_factory

log = logging.getLogger("ray.serve")


class Item(NamedTuple):
    """One image of the shared batch queue, with the policy it is scored under and the tenant it is counted for."""

    image: Any
    policy: str | None = None  # a name the checker holds (None: its own policy)
    tenant: str | None = None  # the metrics' tenant tag (None: "default")


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
        self.metrics = CheckerMetrics()  # batch sizes; per tenant: scored, flagged, actions, unscorable by reason
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
                    **({"policies": runtime.policies} if runtime.policies else {}),  # a stand-in may hold none
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

    def _decode(self, items: list[Item]) -> tuple[list[Any], dict[str, str]]:
        """Runs in a worker thread, outside the model lock: items -> their views or that item's decode error (an
        unknown policy's items: None), and {unknown policy: why}."""
        start = time.perf_counter()
        names = [item.policy for item in items]
        unknown = self._unknown(names)
        ok = [i for i, name in enumerate(names) if name not in unknown]
        images = [items[i].image for i in ok]
        if any(names[i] is not None for i in ok):
            viewed = self.checker.views(images, policies=[names[i] for i in ok])  # type: ignore[call-arg]
        else:  # the own policy only: the call every stand-in implements
            viewed = self.checker.views(images)
        objects: list[Any] = [None] * len(items)
        for i, obj in zip(ok, viewed, strict=True):
            objects[i] = obj
        self.split["decode_s"] += time.perf_counter() - start
        return objects, unknown

    def _unknown(self, names: list[str | None]) -> dict[str, str]:
        """The policy names among ``names`` the checker cannot score with -> why (they fail their own items only)."""
        unknown: dict[str, str] = {}
        core = policy_core(self.checker)
        for name in dict.fromkeys(n for n in names if n is not None):
            if core is None:
                unknown[name] = f"policy {name!r} is not configured: this checker holds no named policies"
                continue
            try:
                core.fingerprint_for(name)  # resolves it (a keyword is built on first use)
            except Exception as exc:  # noqa: BLE001 - this policy's items fail, never the batch
                unknown[name] = str(exc) if isinstance(exc, InvalidInput) else f"policy {name!r} failed to load: {exc}"
        return unknown

    def _score_sync(self, items: list[Item], objects: list[Any], unknown: dict[str, str]) -> list[dict[str, Any]]:
        """Runs in a worker thread. Never raises: a failure becomes every item's ``unavailable`` result, an unknown
        policy its own items'."""
        ok = [i for i, item in enumerate(items) if item.policy not in unknown]
        names = [items[i].policy for i in ok]
        try:
            with self._lock:
                start, preprocess_s = time.perf_counter(), self._preprocess_s()
                scoring = [objects[i] for i in ok]
                if any(name is not None for name in names):
                    verdicts = self.checker.score_views(scoring, policies=names)  # type: ignore[call-arg]
                else:
                    verdicts = self.checker.score_views(scoring)
                elapsed, preprocessing = time.perf_counter() - start, self._preprocess_s() - preprocess_s
                self.split["preprocess_s"] += preprocessing
                self.split["model_s"] += elapsed - preprocessing
                self.split["images"] += len(scoring)
                self.split["views"] += sum(v.views for v in verdicts)
                # fingerprint and demo/real parts follow each item's policy (its text concepts, its detectors)
                identity = {name: self._identity(name) for name in dict.fromkeys(names)}
        except Exception as exc:  # noqa: BLE001 - the batch must not fail its callers with an exception
            log.exception("checker batch of %d failed", len(items))
            failed = f"checker failed: {type(exc).__name__}"
            return [{"unavailable": unknown.get(str(item.policy), failed)} for item in items]
        try:  # the metrics never fail a batch that was scored
            self.metrics.decided(len(items), [items[i].tenant for i in ok], verdicts)
        except Exception:  # noqa: BLE001
            log.exception("checker metrics of a batch of %d failed", len(items))
        results: list[dict[str, Any]] = [{"unavailable": unknown.get(str(item.policy))} for item in items]
        for i, name, v in zip(ok, names, verdicts, strict=True):
            fingerprint, checker = identity[name]
            results[i] = {
                "verdict": v,
                "batch_size": len(items),
                "fingerprint": fingerprint,
                "checker": checker,
                "policy": name,
            }
        return results

    def _identity(self, name: str | None) -> tuple[str, dict[str, Any]]:
        """(fingerprint, the result's ``checker``: identity, fingerprint and demo/real parts) under policy ``name``."""
        core = policy_core(self.checker)
        if name is None or core is None:
            fingerprint, parts = self.checker.fingerprint, getattr(self.checker, "parts", {})
        else:
            fingerprint, parts = core.fingerprint_for(name), core.parts_for(name)
        return fingerprint, {**self.identity, "fingerprint": fingerprint, **parts}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _score(self, items: list[Item]) -> list[dict[str, Any]]:
        try:  # decoding overlaps the other batch's vision pass; the model lock keeps passes one at a time
            objects, unknown = await asyncio.to_thread(self._decode, items)
        except Exception as exc:  # noqa: BLE001 - as in _score_sync: every item's result, never an exception
            log.exception("decoding a checker batch of %d failed", len(items))
            return [{"unavailable": f"checker failed: {type(exc).__name__}"} for _ in items]
        return await asyncio.to_thread(self._score_sync, items, objects, unknown)

    async def check_many(
        self, images: list[Any], policy: str | None = None, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Images (uint8 arrays or encoded bytes) -> results in order; each image joins the shared batch queue, whose
        batches mix tenants and policies and are scored in one pass. ``policy``: a name the checker holds (None: its
        own); ``tenant``: the metrics' tag. An unknown policy's images get ``{"unavailable": why}``."""
        return list(await asyncio.gather(*(self._score(Item(image, policy, tenant)) for image in images)))

    def info(self, policy: str | None = None) -> dict[str, Any]:
        """The core's info under ``policy`` (None: its own; unknown: InvalidInput), with two batch sizes told apart:
        ``batching`` is the cross-request ``@serve.batch`` (objects per batch, batches in flight);
        ``views_per_model_call`` the core's chunk of views per vision pass, which the core's ``max_batch_size`` field
        also gives (kept for existing clients: the same figure)."""
        if policy is not None and policy_core(self.checker) is None:
            raise InvalidInput(f"policy {policy!r} is not configured: this checker holds no named policies")
        core = self.checker.info(policy) if policy is not None else self.checker.info()
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
