"""Every ``diffguard_*`` series the Serve deployments export, defined in one place (docs/HTTP_API.md lists them).

Ray exports them on each node's metrics agent with the prefix ``ray_`` (counters also get ``_total``) and Serve adds
the ``deployment``, ``replica`` and ``application`` labels. A metric takes its replica's context when it is made, so
these are built in a replica's constructor, never at import time.

    >>> self.metrics = CheckerMetrics()  # in SafetyCheckerDeployment.__init__
    >>> self.metrics.decided(len(items), tenants, verdicts)  # after each batch
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ray.serve.metrics import Counter, Gauge, Histogram

from pipeline.policy import image_action
from pipeline.unscorable import unscorable_reason

if TYPE_CHECKING:
    from pipeline.verdict import Verdict

# s, the checker call's; 15 and 20 bound the latency alert's threshold (checker_timeout_s / 2) without interpolating
LATENCY_BUCKETS_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30]
CHECKER_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]  # images per checker batch
GENERATOR_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]  # images or requests per pipeline call
GAUGE_REFRESH_S = 5.0  # Ray's agent drops a gauge not recorded for two export intervals (~20 s): record it this often


DECISION_ROUTES = ("generate", "moderate")


def declare(metric: Counter, *tags: dict[str, str]) -> None:
    """Export ``metric`` at 0 for each label set before its first event: a series that is born at 1 reads as no
    increase to ``increase()`` and ``rate()``, so the first audit failure or 503 would never alert. Ray's ``inc``
    refuses 0; its ``_record`` takes it (tests/e2e/test_prometheus.py holds every alerted series exported)."""
    for t in tags or ({},):
        metric._record(0, tags=dict(t))


class IngressMetrics:
    """Decision requests (route, tenant, status) and their latency; audit rows and keys files that were refused."""

    def __init__(self) -> None:
        self.requests = Counter(
            "diffguard_requests",
            description="decision requests answered, by status",
            tag_keys=("route", "tenant", "status"),
        )
        self.latency = Histogram(
            "diffguard_moderation_latency_s",
            description="seconds of the checker call: from sending the images to their verdicts",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route", "tenant"),
        )
        self.audit_failures = Counter(
            "diffguard_audit_failures", description="audit rows that could not be written", tag_keys=("route",)
        )
        self.keys_failures = Counter(
            "diffguard_keys_reload_failures", description="keys file changes refused (the last good file stays)"
        )
        declare(self.keys_failures)
        declare(self.audit_failures, *({"route": route} for route in DECISION_ROUTES))

    def tenants(self, names: set[str]) -> None:
        """Declare each tenant's 503 series (the checker-unavailable alert's numerator) at 0."""
        for name in sorted(names):
            declare(self.requests, *({"route": r, "tenant": name, "status": "503"} for r in DECISION_ROUTES))


def quota_unavailable() -> Counter:
    """Requests the ingress allowed without a quota check (the QuotaClient's fail-open count), by tenant."""
    return Counter(
        "diffguard_quota_unavailable",
        description="requests allowed without a quota check: the quota keeper was gone, failing or slow",
        tag_keys=("tenant",),
    )


class CheckerMetrics:
    """Per batch: its size; per image decided: its tenant, the action taken, each flagged concept or category, and
    why it was unscorable (:func:`pipeline.unscorable.unscorable_reason`)."""

    def __init__(self) -> None:
        self.batch_sizes = Histogram(
            "diffguard_checker_batch_size", description="images per checker batch", boundaries=CHECKER_BATCH_BUCKETS
        )
        self.scored = Counter("diffguard_images_scored", description="images scored, by tenant", tag_keys=("tenant",))
        self.flagged = Counter(
            "diffguard_images_flagged",
            description="images flagged, by concept and tenant",
            tag_keys=("concept", "tenant"),
        )
        self.actions = Counter(
            "diffguard_image_actions",
            description="images decided, by the action the policy takes (allow, flag, blur, black, block) and tenant",
            tag_keys=("action", "tenant"),
        )
        self.unscorable = Counter(
            "diffguard_images_unscorable",
            description="images read but not scorable, by reason (corrupt, too_large, unsupported, view_budget, "
            "detector, other) and tenant",
            tag_keys=("reason", "tenant"),
        )

    def decided(self, batch_size: int, tenants: Sequence[str | None], verdicts: Sequence[Verdict]) -> None:
        """A batch of ``batch_size`` items whose ``verdicts`` came back, of ``tenants`` (None: "default") in order."""
        self.batch_sizes.observe(batch_size)
        pairs = list(zip([tenant or "default" for tenant in tenants], verdicts, strict=True))
        for tenant, n in Tally(t for t, _ in pairs).items():
            self.scored.inc(n, tags={"tenant": tenant})
        for (action, tenant), n in Tally((image_action(v), t) for t, v in pairs).items():
            self.actions.inc(n, tags={"action": action, "tenant": tenant})
        unscorable = Tally((unscorable_reason(v.error), t) for t, v in pairs if v.error is not None)
        for (reason, tenant), n in unscorable.items():
            self.unscorable.inc(n, tags={"reason": reason, "tenant": tenant})
        for tenant, v in pairs:
            for concept in v.bad_concept_names + v.flagged_categories:
                self.flagged.inc(tags={"concept": concept, "tenant": tenant})


class GeneratorMetrics:
    """Per pipeline call: its images and requests; the replica's batch queue and renders in flight, as gauges."""

    def __init__(self) -> None:
        self.generated = Counter("diffguard_images_generated", description="images generated")
        self.batch_images = Histogram(
            "diffguard_generator_batch_images",
            description="images per generation call",
            boundaries=GENERATOR_BATCH_BUCKETS,
        )
        self.batch_requests = Histogram(
            "diffguard_generator_batch_requests",
            description="requests per generation call",
            boundaries=GENERATOR_BATCH_BUCKETS,
        )
        self.queue = Gauge(
            "diffguard_generator_queue_images",
            description="images waiting in the generator replica's batch queue, not rendering yet",
        )
        self.inflight = Gauge("diffguard_generator_inflight_images", description="images the replica is rendering now")
        self._depth, self._lock = (0, 0), threading.Lock()  # the event loop sets them; the refresher re-records
        self.depth(0, 0)  # exported from the start, not from the first request
        # and kept exported while nothing changes (an idle generator's 0 is a value, not a missing series)
        threading.Thread(target=self._refresh, name="generator-gauges", daemon=True).start()

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._lock:  # the current values, never an older pair written back over a newer one
                self.queue.set(self._depth[0])
                self.inflight.set(self._depth[1])

    def batch(self, requests: int, images: int) -> None:
        """A pipeline call that rendered ``requests`` requests of ``images`` images in all."""
        self.batch_requests.observe(requests)
        self.batch_images.observe(images)
        self.generated.inc(images)

    def depth(self, queued: int, inflight: int) -> None:
        """The batcher's images waiting and rendering (:class:`deployments.batching.GenerationBatcher`'s on_depth)."""
        with self._lock:
            self._depth = (queued, inflight)
            self.queue.set(queued)
            self.inflight.set(inflight)
