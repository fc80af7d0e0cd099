"""The QuotaKeeper deployment and its fail-open client (``deployments.quota``, issue 28 §3) on a real local Ray: only
the keeper is deployed, driven through a handle."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

import pytest

from pipeline.keys import Limits
from pipeline.quota import Decision, Quotas

KIDS = Limits(requests_per_s=5, burst=10, images_per_min=600)


class SlowQuotas(Quotas):
    """A keeper whose every take blocks its replica for a second: slower than any client waits."""

    def take(self, *args, **kwargs):
        time.sleep(1.0)
        return super().take(*args, **kwargs)


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings(ray_cluster):
    from ray import serve

    serve.start()  # Serve sets up the driver's "ray.serve" logger when it starts: add the handler after that
    handler, logger = Captured(), logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        serve.shutdown()  # the next module starts Serve with its own HTTP options (a running Serve keeps its port)


def test_the_keeper_counts_a_burst_refuses_and_takes_both_or_nothing(ray_cluster, warnings):
    from ray import serve

    from deployments.quota import QuotaClient, QuotaKeeper

    handle = serve.run(QuotaKeeper.bind(), name="quota-test", route_prefix=None)
    try:
        take = handle.take
        slow = Limits(requests_per_s=0.1, burst=10).as_dict()  # a token each 10 s: the test never waits for one
        answers = [take.remote("kids-app", slow, 1, 0).result() for _ in range(10)]
        assert all(a["allowed"] for a in answers)
        refused = take.remote("kids-app", slow, 1, 0).result()
        assert not refused["allowed"] and 0 < refused["retry_after_s"] <= 10.0
        assert refused["reason"] == "key 'kids-app' is over its requests_per_s of 0.1 (burst 10)"

        images = Limits(requests_per_s=0.1, burst=1, images_per_min=6).as_dict()
        assert take.remote("img", images, 0, 6).result()["allowed"]  # every image token, no request token
        refused = take.remote("img", images, 1, 1).result()
        assert not refused["allowed"] and "images_per_min of 6" in refused["reason"]
        assert take.remote("img", images, 1, 0).result()["allowed"]  # the request token was not spent by the refusal
        too_large = take.remote("img", images, 0, 7).result()
        assert too_large["too_large"] and too_large["retry_after_s"] == float("inf")

        client = QuotaClient(handle, timeout_s=5.0)
        assert asyncio.run(client.take("free", Limits(), 1, 10**6)) is None  # no limits: the keeper is not called
        calls = []

        async def round_trips(n: int) -> None:
            for _ in range(n):
                start = time.perf_counter()
                decision = await client.take("timed", Limits(requests_per_s=1e6, burst=10**6), 1, 0)
                calls.append(time.perf_counter() - start)
                assert decision == Decision(True)

        asyncio.run(round_trips(200))
        print(f"\nQuotaKeeper round trip through QuotaClient: median {statistics.median(calls) * 1e3:.2f} ms over 200")
        assert client.unavailable == 0 and warnings == []
    finally:
        serve.delete("quota-test")

    client = QuotaClient(handle, timeout_s=0.25)
    gone = asyncio.run(client.take("kids-app", KIDS, 1, 0, tenant="kids"))
    assert gone.allowed and "quota keeper unavailable" in gone.reason
    assert asyncio.run(client.take("kids-app", KIDS, 1, 0, tenant="kids")).allowed
    assert client.unavailable == 2, gone
    assert len([m for m in warnings if "quota keeper unavailable" in m]) == 1  # at most one warning per 30 s
    assert "key 'kids-app' allowed without a quota check (fail open" in warnings[0]


def test_a_slow_keeper_fails_open_within_the_clients_timeout(ray_cluster, warnings):
    from ray import serve

    from deployments.quota import QuotaClient, QuotaKeeper

    handle = serve.run(QuotaKeeper.bind(quotas_factory=SlowQuotas), name="quota-slow", route_prefix=None)
    try:
        client = QuotaClient(handle, timeout_s=0.25)
        decision = asyncio.run(client.take("kids-app", KIDS, 1, 0, tenant="kids"))
        assert decision.allowed and "no answer within 0.25s" in decision.reason and client.unavailable == 1
        assert any("no answer within 0.25s" in m for m in warnings)
    finally:
        serve.delete("quota-slow")
