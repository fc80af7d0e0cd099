"""The QuotaKeeper deployment (one replica holding every key's token buckets, :class:`pipeline.quota.Quotas`) and the
ingress's client for it, which fails open: a keeper that is gone or slow must not take the service down with it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray import serve

from pipeline.keys import Limits
from pipeline.quota import Decision, Quotas

from .metrics import declare, quota_unavailable

log = logging.getLogger("ray.serve")

WARN_EVERY_S = 30.0  # the keeper-unavailable warning is logged at most this often per client


@serve.deployment(
    name="QuotaKeeper",
    # one replica: the buckets are one shared count, not one per replica (a fixed range rather than num_replicas: Serve
    # 2.60 warns "Cannot deregister autoscaling state" at every start and stop of a deployment without one)
    autoscaling_config={"min_replicas": 1, "max_replicas": 1},
    # a hundredth of a CPU, not 0: a KubeRay head offers none (num-cpus 0), so the keeper never lands on the head and
    # dies with it (tests/reliability/head_loss.py found it there with 0)
    ray_actor_options={"num_cpus": 0.01},
    max_ongoing_requests=1000,  # a take is microseconds of Python; never the queue a request waits in
)
class QuotaKeeper:
    """Holds one ``Quotas``: ``await handle.take.remote("kids-app", {"requests_per_s": 5}, requests=1)``."""

    def __init__(self, quotas_factory: Callable[[], Quotas] = Quotas):
        self.quotas = quotas_factory()
        self._limits: dict[tuple[tuple[str, Any], ...], Limits] = {}  # parsed limits by their items (a keys file's few)

    async def take(self, key_id: str, limits: dict[str, Any], requests: int = 0, images: int = 0) -> dict[str, Any]:
        """A :class:`pipeline.quota.Decision` as a dict (``allowed``, ``retry_after_s``, ``reason``, ``too_large``)."""
        items = tuple(sorted(limits.items()))
        parsed = self._limits.get(items)
        if parsed is None:
            if len(self._limits) > 10_000:  # limits come from a keys file; bound the cache all the same
                self._limits.clear()
            parsed = self._limits[items] = Limits.parse(limits, f"key {key_id!r}")
        return self.quotas.take(key_id, parsed, requests, images).as_dict()


class QuotaClient:
    """The ingress's side: ``await QuotaClient(handle).take(key.id, key.limits, requests=1, images=n, tenant=t)``.

    Returns None for a key without limits (the keeper is not called), else the keeper's :class:`Decision`. When the
    keeper is gone, fails or does not answer within ``timeout_s``, the request is allowed (fail open): the metric
    ``diffguard_quota_unavailable`` (tag ``tenant``) counts it and a warning is logged at most every 30 s.
    """

    def __init__(self, handle: Any, timeout_s: float = 0.25, clock: Callable[[], float] = time.monotonic):
        self.handle = handle  # a DeploymentHandle to QuotaKeeper
        self.timeout_s = timeout_s
        self.clock = clock
        self.unavailable = 0  # takes allowed without the keeper, since start (the metric's count in this process)
        self._warned_at = -float("inf")
        self._metric = quota_unavailable()

    def declare(self, tenants: set[str]) -> None:
        """Each tenant's series at 0, so the first fail-open take shows as an increase."""
        declare(self._metric, *({"tenant": t} for t in sorted(tenants)))

    async def take(
        self, key_id: str, limits: Limits, requests: int = 1, images: int = 0, *, tenant: str | None = None
    ) -> Decision | None:
        if limits.unlimited:
            return None
        response = None
        try:
            response = self.handle.take.remote(key_id, limits.as_dict(), requests, images)
            return Decision(**await asyncio.wait_for(response, self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - timeout, deleted app, dead replica, back pressure: all fail open
            if response is not None and isinstance(exc, TimeoutError):
                response.cancel()
            return self._fail_open(key_id, tenant or key_id, exc)

    def _fail_open(self, key_id: str, tenant: str, exc: BaseException) -> Decision:
        self.unavailable += 1
        self._metric.inc(tags={"tenant": tenant})
        cause = f"no answer within {self.timeout_s:g}s" if isinstance(exc, TimeoutError) else repr(exc)[:300]
        now = self.clock()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "quota keeper unavailable (%s): key %r allowed without a quota check (fail open; %d so far)",
                cause,
                key_id,
                self.unavailable,
            )
        return Decision(True, 0.0, f"quota keeper unavailable ({cause}): allowed without a quota check")
