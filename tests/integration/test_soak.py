"""A short load soak (the CI version of ``make soak``): 64 concurrent clients mixing generate and moderate against
the shipped local app for ~30 s, bounded in time and requests. Only 200 and 503-with-Retry-After are allowed, every
released image carries its own verdict, no replica is replaced and replica memory growth stays bounded."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import free_port
from tests.reliability.apps import apply
from tests.reliability.load import disallowed, verify_samples
from tests.reliability.soak import soak, soak_config

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

MEMORY_SLACK_MIB = 256  # allowed growth of a replica beyond half its starting size


@pytest.fixture(scope="module")
def service(ray_cluster):
    from ray import serve

    port = free_port()
    apply(soak_config(port))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_short_soak(service, checker):
    stats, figures = asyncio.run(soak(service, clients=64, duration_s=30, max_requests=50_000, warmup_s=10))
    print({k: v for k, v in figures.items()})
    assert disallowed(stats, {"200", "503"}) == {}, figures["statuses"]
    assert stats.missing_retry_after == 0
    assert figures["by_route"]["moderate"].get("200", 0) > 0 and figures["by_route"]["generate"].get("200", 0) > 0
    assert verify_samples(stats, checker) == min(stats.images_out, 256) > 0
    assert stats.unchecked_images_out == 0 and stats.problems == []
    assert figures["replicas_replaced"] == {"Ingress": 0, "Generator": 0, "SafetyChecker": 0}
    for deployment, start in figures["memory_mib_start"].items():
        assert start > 0 and figures["memory_mib_growth"][deployment] < start / 2 + MEMORY_SLACK_MIB, figures
