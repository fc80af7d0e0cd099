"""Quotas (``pipeline.quota``, issue 28 §3): token buckets per key, on an injected clock, asserted exactly."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import InvalidInput
from pipeline.keys import Limits
from pipeline.quota import SWEEP_EVERY_S, Decision, Quotas

KIDS = Limits(requests_per_s=5, burst=10, images_per_min=600)


def test_a_burst_then_refusals_that_say_when_to_come_back():
    q = Quotas(clock=lambda: pytest.fail("the injected `now` is the clock"))
    assert all(q.take("kids-app", KIDS, requests=1, now=0.0).allowed for _ in range(10))
    refused = q.take("kids-app", KIDS, requests=1, now=0.0)
    assert refused == Decision(False, 0.2, "key 'kids-app' is over its requests_per_s of 5 (burst 10)")
    assert not q.take("kids-app", KIDS, requests=1, now=0.1).allowed  # half a token back
    assert q.take("kids-app", KIDS, requests=1, now=0.2).allowed  # one token back: exactly one more
    assert q.take("kids-app", KIDS, requests=1, now=0.2).retry_after_s == pytest.approx(0.2)
    assert sum(q.take("kids-app", KIDS, requests=1, now=100.0).allowed for _ in range(20)) == 10  # never beyond burst


def test_images_per_minute_and_take_both_or_nothing():
    q = Quotas()
    limits = Limits(requests_per_s=1, burst=2, images_per_min=60)
    assert q.take("k", limits, requests=1, images=50, now=0.0).allowed
    refused = q.take("k", limits, requests=1, images=20, now=0.0)  # 10 images left: 10 s until 20 fit
    assert refused == Decision(False, 10.0, "key 'k' is over its images_per_min of 60")
    assert q.buckets["k"].requests == 1.0  # the refused request spent no request token
    assert q.take("k", limits, requests=1, images=10, now=0.0).allowed
    both = q.take("k", limits, requests=1, images=1, now=0.5)  # requests: 0.5 s away; images: 0.5 s away too
    assert not both.allowed and both.retry_after_s == 0.5
    short = q.take("k", limits, requests=1, images=5, now=1.0)  # requests fit, images need 4 s more
    assert short.retry_after_s == 4.0 and "images_per_min" in short.reason
    assert q.take("k", limits, requests=1, images=5, now=5.0).allowed


def test_more_than_a_bucket_holds_can_never_fit():
    q = Quotas()
    too_many = q.take("kids-app", KIDS, requests=1, images=601, now=0.0)
    assert too_many == Decision(
        False,
        math.inf,
        "key 'kids-app' asked for 601 images at once, more than its images_per_min of 600",
        too_large=True,
    )
    assert q.take("kids-app", KIDS, requests=11, now=0.0).too_large
    assert q.take("kids-app", KIDS, requests=10, images=600, now=0.0).allowed  # exactly the capacity fits


def test_unlimited_and_partial_limits():
    q = Quotas()
    assert q.take("free", Limits(), requests=10**6, images=10**6, now=0.0) == Decision(True) and len(q) == 0
    images_only = Limits(images_per_min=6)
    assert all(q.take("img", images_only, requests=1, images=1, now=0.0).allowed for _ in range(6))
    assert q.take("img", images_only, requests=1, images=1, now=0.0).retry_after_s == 10.0
    assert q.take("img", images_only, requests=1, images=0, now=0.0).allowed  # no request limit
    rate_only = Limits(requests_per_s=0.5)  # burst 1
    assert q.take("r", rate_only, requests=1, images=10**6, now=0.0).allowed
    assert q.take("r", rate_only, requests=1, now=0.0).retry_after_s == 2.0


def test_limits_changed_by_a_reload_apply_at_once():
    q = Quotas()
    assert q.take("k", KIDS, requests=2, now=0.0).allowed  # 8 of 10 left
    smaller = Limits(requests_per_s=1, burst=3)
    assert q.take("k", smaller, requests=3, now=0.0).allowed  # clamped to 3: all 3 taken
    assert q.take("k", smaller, requests=1, now=0.0).retry_after_s == 1.0  # and at the new rate
    assert q.take("k", smaller, images=10**6, now=0.0).allowed  # the image limit is gone
    added = Limits(requests_per_s=1, burst=3, images_per_min=60)
    assert q.take("k", added, requests=0, images=60, now=0.0).allowed  # an added limit starts full
    assert q.take("k", KIDS, requests=1, now=0.0).retry_after_s == 0.2  # a bigger burst gives no tokens at once
    assert q.take("k", KIDS, requests=1, now=0.2).allowed and q.buckets["k"].requests == 0.0  # it refills at 5/s


def test_idle_keys_are_forgotten_once_their_buckets_would_be_full():
    q = Quotas()
    q.take("fast", Limits(requests_per_s=10, burst=10), requests=10, now=0.0)  # full again after 1 s
    q.take("images", Limits(images_per_min=60), images=60, now=0.0)  # full again after 60 s
    q.take("slow", Limits(requests_per_s=0.01, burst=1), requests=1, now=0.0)  # full again after 100 s
    q.take("other", Limits(requests_per_s=1), requests=1, now=SWEEP_EVERY_S)
    assert set(q.buckets) == {"images", "slow", "other"}
    q.take("other", Limits(requests_per_s=1), requests=1, now=SWEEP_EVERY_S + 1)  # no sweep between sweeps
    assert set(q.buckets) == {"images", "slow", "other"}
    q.take("other", Limits(requests_per_s=1), requests=1, now=2 * SWEEP_EVERY_S + 1)
    assert set(q.buckets) == {"slow", "other"}  # 61 s: the images bucket is full again
    q.take("other", Limits(requests_per_s=1), requests=1, now=99.0)
    assert set(q.buckets) == {"slow", "other"}
    q.take("other", Limits(requests_per_s=1), requests=1, now=130.0)
    assert set(q.buckets) == {"other"}
    assert q.take("slow", Limits(requests_per_s=0.01, burst=1), requests=1, now=130.0).allowed  # a fresh full bucket


def test_a_clock_that_steps_back_refills_nothing():
    q = Quotas()
    limits = Limits(requests_per_s=1, burst=1)
    assert q.take("k", limits, requests=1, now=10.0).allowed
    assert not q.take("k", limits, requests=1, now=5.0).allowed
    assert not q.take("k", limits, requests=1, now=10.5).allowed
    assert q.take("k", limits, requests=1, now=11.0).allowed


@pytest.mark.parametrize(("requests", "images"), [(-1, 0), (0, -2), (True, 0), (1.5, 0), (0, "3")])
def test_counts_are_whole_numbers(requests, images):
    with pytest.raises(InvalidInput, match=r"quota take for key 'k': `(requests|images)` must be a whole number >= 0"):
        Quotas().take("k", KIDS, requests=requests, images=images, now=0.0)


def test_a_decision_travels_as_a_dict():
    refused = Decision(False, 0.2, "why")
    assert Decision(**refused.as_dict()) == refused
    assert refused.as_dict() == {"allowed": False, "retry_after_s": 0.2, "reason": "why", "too_large": False}
