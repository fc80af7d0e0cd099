"""Concurrent HTTP load against the Serve app, bounded in requests and time, with every response audited.

The audit is the fail-closed invariant, checked on real responses: an image's bytes leave only with a verdict the
checker produced for that image (``verify`` recomputes it in-process from the released pixels); errors carry no image
bytes; a 503 carries ``Retry-After``. Statuses outside ``allowed`` are counted as problems.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

TOL = 1.1e-3  # scores are rounded to 3 decimals; a different batch size may round the last digit differently
MAX_PROBLEMS = 50  # keep the first problems only
MAX_SAMPLES = 256  # released images kept for in-process verification


@dataclass(frozen=True)
class Call:
    """One kind of request: ``make(i)`` returns httpx ``post`` kwargs for the i-th request of this kind."""

    route: str  # "generate" | "moderate"
    path: str  # URL path under the base, e.g. "/v1/generate"
    make: Callable[[int], dict[str, Any]]
    images: int = 1  # images per request (moderate: files sent)


@dataclass
class Outcome:
    start: float  # seconds since the run started
    end: float
    route: str
    status: str  # "200", "503", ... or "transport:<ExceptionName>"


@dataclass
class LoadStats:
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    images_out: int = 0  # image bytes released (generate)
    images_withheld: int = 0  # images reported without bytes (blocked by policy)
    unchecked_images_out: int = 0  # image bytes without this request's verdict: must be 0
    missing_retry_after: int = 0  # 503s without Retry-After: must be 0
    errors: Counter = field(default_factory=Counter)  # "<status> <error message, shortened>" -> count
    generator_batches: Counter = field(default_factory=Counter)  # generator_batch_size of 200 generate responses
    samples: list[tuple[np.ndarray, dict[str, Any]]] = field(default_factory=list, repr=False)
    duration_s: float = 0.0
    t0: float = field(default_factory=time.monotonic)  # when the load started (outcome times are relative to it)

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    def statuses(self, route: str | None = None) -> dict[str, int]:
        return dict(sorted(Counter(o.status for o in self.outcomes if route in (None, o.route)).items()))

    def latencies(self, route: str | None = None, status: str = "200") -> list[float]:
        return sorted(o.end - o.start for o in self.outcomes if o.status == status and route in (None, o.route))

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 3) if values else None

        ok = self.latencies()
        routes = sorted({o.route for o in self.outcomes})
        return {
            "requests": self.requests,
            "duration_s": round(self.duration_s, 1),
            "throughput_rps": round(self.requests / self.duration_s, 2) if self.duration_s else None,
            "statuses": self.statuses(),
            "by_route": {r: self.statuses(r) for r in routes},
            "p50_s": pct(ok, 50),
            "p99_s": pct(ok, 99),
            "p50_s_by_route": {r: pct(self.latencies(r), 50) for r in routes},
            "p99_s_by_route": {r: pct(self.latencies(r), 99) for r in routes},
            "images_out": self.images_out,
            "images_withheld": self.images_withheld,
            "unchecked_images_out": self.unchecked_images_out,
            "missing_retry_after": self.missing_retry_after,
            "generator_batch_sizes": dict(sorted(self.generator_batches.items())),
            "problems": len(self.problems),
            "errors": dict(self.errors.most_common(8)),
        }


def _shorten(message: str) -> str:
    """An error message without its variable parts (request ids, sizes), so equal causes count together."""
    import re

    return re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "N", message)[:120]


def _decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def audit(stats: LoadStats, call: Call, response: httpx.Response) -> None:
    """Check one response against the invariants; count what it released."""
    text = response.text
    if response.status_code != 200:
        try:
            message = str(response.json().get("error", ""))
        except ValueError:
            message = text
        stats.errors[f"{response.status_code} {_shorten(message)}"] += 1
        if "image_png_base64" in text or '"images"' in text:
            stats.unchecked_images_out += text.count("image_png_base64")
            stats.problem(f"{call.route} {response.status_code} carried image fields: {text[:200]}")
        if response.status_code == 503 and not response.headers.get("retry-after"):
            stats.missing_retry_after += 1
            stats.problem(f"{call.route} 503 without Retry-After: {text[:200]}")
        return
    body = response.json()
    if call.route == "moderate":
        rows = body.get("results", [])
        if len(rows) != call.images:
            stats.problem(f"moderate returned {len(rows)} rows for {call.images} files")
        for row in rows:
            if row.get("error") is None and len(row.get("concept_scores") or []) == 0:
                stats.problem(f"moderate row without scores or error: {row}")
        return
    images = body.get("images", [])
    batch = body.get("generator_batch_size")
    if isinstance(batch, int) and batch >= 1:
        stats.generator_batches[batch] += 1
    else:
        stats.problem(f"generate response without a generator_batch_size: {batch!r}")
    if len(images) != call.images:
        stats.problem(f"generate returned {len(images)} images for num_images={call.images}")
    for image in images:
        mod = image.get("moderation") or {}
        scored = mod.get("error") is None and len(mod.get("concept_scores") or []) > 0
        if image.get("image_png_base64") is None:
            stats.images_withheld += 1
            continue
        stats.images_out += 1
        if not scored or image.get("action") == "block":
            stats.unchecked_images_out += 1
            stats.problem(f"image bytes released without a verdict: {mod}")
        elif len(stats.samples) < MAX_SAMPLES:
            stats.samples.append((_decode_png(image["image_png_base64"]), mod))


def verify_samples(stats: LoadStats, checker: Any) -> int:
    """Recompute each kept released image's verdict in-process; a mismatch is a released image this request's checker
    did not score. Returns the number verified; mismatches are counted as unchecked images and problems."""
    for start in range(0, len(stats.samples), 32):
        chunk = stats.samples[start : start + 32]
        for (_, mod), verdict in zip(chunk, checker.check([p for p, _ in chunk]), strict=True):
            same = verdict.nsfw == mod["nsfw"] and np.allclose(verdict.concept_scores, mod["concept_scores"], atol=TOL)
            if not same:
                stats.unchecked_images_out += 1
                stats.problem(f"released pixels score {verdict.concept_scores[:3]}..., the response says {mod}")
    return len(stats.samples)


async def run_load(
    base: str,
    calls: list[tuple[float, Call]],
    clients: int,
    duration_s: float,
    max_requests: int,
    headers: dict[str, str] | None = None,
    timeout_s: float = 120,
    seed: int = 0,
    stats: LoadStats | None = None,
    stop: asyncio.Event | None = None,
    backoff_s: float = 1.0,
) -> LoadStats:
    """``clients`` concurrent loops, each picking a call by weight, until ``duration_s`` passes, ``max_requests``
    have been sent, or ``stop`` is set. After a 503 a client waits its Retry-After, at most ``backoff_s``.
    Loopback only: ``base`` must be a 127.0.0.1/localhost URL."""
    if not base.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise ValueError(f"load is sent to loopback only, got {base!r}")
    stats = stats or LoadStats()
    weights = [w for w, _ in calls]
    rng = random.Random(seed)
    sent = 0
    t0 = stats.t0 = time.monotonic()
    deadline = t0 + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < deadline and sent < max_requests and not (stop and stop.is_set()):
            sent += 1
            call = rng.choices([c for _, c in calls], weights)[0]
            start = time.monotonic()
            try:
                response = await c.post(call.path, **call.make(sent))
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                response, status = None, f"transport:{type(exc).__name__}"
            stats.outcomes.append(Outcome(start - t0, time.monotonic() - t0, call.route, status))
            if response is not None:
                audit(stats, call, response)
                if response.status_code == 503 and backoff_s:  # a polite client waits as told (capped)
                    await asyncio.sleep(min(float(response.headers.get("retry-after") or 0), backoff_s))

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout_s, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    stats.duration_s = time.monotonic() - t0
    return stats


def moderate_call(path: str, pngs: list[bytes], files: int = 1) -> Call:
    def make(i: int) -> dict[str, Any]:
        chosen = [pngs[(i + k) % len(pngs)] for k in range(files)]
        return {"files": [("files", (f"{i}-{k}.png", p, "image/png")) for k, p in enumerate(chosen)]}

    return Call("moderate", path, make, files)


def generate_call(path: str, num_images: int = 1, steps: int = 1, size: int = 64) -> Call:
    def make(i: int) -> dict[str, Any]:
        fields = {"num_images": num_images, "steps": steps, "seed": i, "width": size, "height": size}
        return {"json": {"prompt": f"a red bicycle {i}", **fields}}

    return Call("generate", path, make, num_images)


def failures_after(stats: LoadStats, since: float) -> dict[str, Any]:
    """Requests that ended after ``since`` (run seconds: in flight then, or sent later) and did not get 200."""
    failed = [o for o in stats.outcomes if o.end >= since and o.status != "200"]
    return {
        "failed": len(failed),
        "statuses": dict(sorted(Counter(o.status for o in failed).items())),
        "last_failure_s": round(max(o.end for o in failed) - since, 2) if failed else 0.0,
    }


def disallowed(stats: LoadStats, allowed: set[str]) -> dict[str, int]:
    """Statuses seen that are not in ``allowed``."""
    return {s: n for s, n in stats.statuses().items() if s not in allowed}
