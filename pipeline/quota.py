"""Quotas: token buckets per API key, for the limits a keys file gives each key (:class:`pipeline.keys.Limits`).

Two buckets a key: requests (size ``burst``, refilled at ``requests_per_s`` a second) and images (size
``images_per_min``, refilled at ``images_per_min / 60`` a second). A request takes from both or from neither: one
refused for its images spends no request token. Limits changed by a keys reload apply at the next take (a bucket
larger than its new size is clamped). A key idle long enough for both its buckets to be full again is forgotten:
that is lossless (a new bucket starts full), and memory stays bounded by the keys in use. Plain Python: no Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import InvalidInput
from .keys import Limits

SWEEP_EVERY_S = 30.0  # how often idle keys' buckets are looked for (each take checks whether it is time)


@dataclass(frozen=True)
class Decision:
    """Whether a request fits its key's quota now."""

    allowed: bool
    retry_after_s: float = 0.0  # seconds until the same request would fit; math.inf when it never can (too_large)
    reason: str = ""  # why it was refused, naming the key and the limit; empty when allowed
    too_large: bool = False  # one request asks for more than the bucket holds: no wait helps (say 413, not 429)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


ALLOWED = Decision(True)


@dataclass
class _Buckets:
    limits: Limits  # the limits they were last brought up to date under
    requests: float | None  # request tokens left; None: no request limit
    images: float | None  # image tokens left; None: no image limit
    stamp: float  # when they were last brought up to date

    def full_after_s(self) -> float:
        """Idle seconds after ``stamp`` by which both buckets are full again, whatever they held."""
        rate, burst, per_min = self.limits.requests_per_s, self.limits.burst, self.limits.images_per_min
        return max(burst / rate if rate and burst else 0.0, 60.0 if per_min else 0.0)


class Quotas:
    """Token buckets per key id.

    >>> quotas = Quotas()
    >>> limits = Limits(requests_per_s=5, burst=10, images_per_min=600)
    >>> quotas.take("kids-app", limits, requests=1, images=4, now=0.0).allowed
    True
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock  # seconds, monotonic; a take's ``now`` overrides it
        self.buckets: dict[str, _Buckets] = {}  # by key id; only keys seen within their refill time
        self._swept = -math.inf

    def take(
        self, key_id: str, limits: Limits, requests: int = 0, images: int = 0, now: float | None = None
    ) -> Decision:
        """Take ``requests`` request tokens and ``images`` image tokens from ``key_id``'s buckets, both or neither."""
        for name, n in (("requests", requests), ("images", images)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidInput(f"quota take for key {key_id!r}: `{name}` must be a whole number >= 0, got {n!r}")
        if limits.unlimited:
            return ALLOWED
        now = self.clock() if now is None else now
        self._sweep(now)
        b = self._refilled(key_id, limits, now)
        waits = [(0.0, "")]  # (seconds until it fits, which limit)
        rate, burst, per_min = limits.requests_per_s, limits.burst, limits.images_per_min
        if b.requests is not None and rate and burst and requests:
            what = f"key {key_id!r} is over its requests_per_s of {rate:g} (burst {burst})"
            if requests > burst:
                return Decision(False, math.inf, f"{what}: {requests} requests at once can never fit", True)
            waits.append((_wait(requests - b.requests, rate), what))
        if b.images is not None and per_min and images:
            if images > per_min:
                why = f"key {key_id!r} asked for {images} images at once, more than its images_per_min of {per_min}"
                return Decision(False, math.inf, why, True)
            waits.append(
                (_wait(images - b.images, per_min / 60.0), f"key {key_id!r} is over its images_per_min of {per_min}")
            )
        wait, why = max(waits)
        if wait > 0:
            return Decision(False, wait, why)
        if b.requests is not None:
            b.requests -= requests
        if b.images is not None:
            b.images -= images
        return ALLOWED

    def _refilled(self, key_id: str, limits: Limits, now: float) -> _Buckets:
        """``key_id``'s buckets brought up to ``now`` under ``limits`` (new ones start full)."""
        r_size, i_size = _float(limits.burst), _float(limits.images_per_min)
        b = self.buckets.get(key_id)
        if b is None:
            b = self.buckets[key_id] = _Buckets(limits, r_size, i_size, now)
            return b
        elapsed = max(0.0, now - b.stamp)  # a clock that steps back refills nothing
        # A limit a reload added starts full; one it removed is gone; a smaller size clamps what is left.
        if r_size is None or b.requests is None:
            b.requests = r_size
        else:
            b.requests = min(r_size, b.requests + elapsed * (limits.requests_per_s or 0.0))
        if i_size is None or b.images is None:
            b.images = i_size
        else:
            b.images = min(i_size, b.images + elapsed * i_size / 60.0)
        b.limits, b.stamp = limits, max(b.stamp, now)
        return b

    def _sweep(self, now: float) -> None:
        """Forget the buckets of keys idle long enough for both to be full again (lossless: a new one starts full)."""
        if now - self._swept < SWEEP_EVERY_S:
            return
        self._swept = now
        for key_id, b in list(self.buckets.items()):
            if now - b.stamp >= b.full_after_s():
                del self.buckets[key_id]

    def __len__(self) -> int:
        return len(self.buckets)


def _wait(deficit: float, rate: float) -> float:
    """Seconds until ``deficit`` tokens have refilled at ``rate`` a second (0 when there is none)."""
    return deficit / rate if deficit > 1e-9 else 0.0


def _float(n: int | None) -> float | None:
    return None if n is None else float(n)
