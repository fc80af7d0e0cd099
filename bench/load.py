"""A closed-loop HTTP load generator: N concurrent clients (asyncio + httpx), each sending its next request as soon
as the previous one is answered. Reports throughput, latency percentiles and what the server said about batching."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


def start_serving_ray(namespace: str = "bench", num_cpus: int | None = None) -> None:
    """A fresh local Ray with the serving settings `diffguard serve` and the k8s manifests give it
    (deployments.run.SERVING_RAY_ENV; a value already in the environment wins), the environment restored after."""
    import os

    import ray

    from deployments.run import SERVING_RAY_ENV

    saved = {k: os.environ.get(k) for k in SERVING_RAY_ENV}
    for k, v in SERVING_RAY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        cpus = num_cpus or os.cpu_count()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, namespace=namespace, log_to_driver=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    """A free TCP port on the loopback interface, for a benchmark's own Serve instance."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sample:
    start: float
    end: float
    ok: bool
    batch_size: int | None


async def _drive(
    send: Callable[[bytes], Awaitable[tuple[bool, int | None]]],
    bodies: list[bytes],
    clients: int,
    warmup_s: float,
    measure_s: float,
) -> tuple[list[Sample], tuple[float, float]]:
    samples: list[Sample] = []
    t0 = time.perf_counter()
    stop = t0 + warmup_s + measure_s

    async def one_client(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            body = bodies[k % len(bodies)]
            k += clients
            start = time.perf_counter()
            ok, batch = await send(body)
            samples.append(Sample(start, time.perf_counter(), ok, batch))

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    window = (t0 + warmup_s, stop)
    return [s for s in samples if window[0] <= s.end <= window[1]], window


def run_load(url: str, bodies: list[bytes], clients: int, warmup_s: float, measure_s: float) -> dict[str, Any]:
    """Requests answered inside the measurement window (after the warm-up) are counted; the clients keep sending
    until the window closes, so the window sees a steady state once the warm-up is longer than a few latencies."""

    async def drive() -> tuple[list[Sample], tuple[float, float]]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def send(body: bytes) -> tuple[bool, int | None]:
                try:
                    r = await client.post(url, content=body, headers={"content-type": "image/png"})
                    ok = r.status_code == 200
                    return ok, r.json()["results"][0]["batch_size"] if ok else None
                except (httpx.HTTPError, ValueError, KeyError):
                    return False, None

            return await _drive(send, bodies, clients, warmup_s, measure_s)

    return _summary(clients, *asyncio.run(drive()))


def run_handle_load(handle: Any, bodies: list[bytes], clients: int, warmup_s: float, measure_s: float) -> dict:
    """The same closed loop straight into the checker deployment's handle: no HTTP proxy, no ingress."""

    async def send(body: bytes) -> tuple[bool, int | None]:
        (result,) = await handle.check_many.remote([body])
        return "verdict" in result, result.get("batch_size")

    return _summary(clients, *asyncio.run(_drive(send, bodies, clients, warmup_s, measure_s)))


def _summary(clients: int, samples: list[Sample], window: tuple[float, float]) -> dict[str, Any]:
    lo, hi = window
    ok = [s for s in samples if s.ok]
    lat = np.array([s.end - s.start for s in ok]) * 1000
    batches = [s.batch_size for s in ok if s.batch_size]
    return {
        "clients": clients,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "images_per_s": len(ok) / (hi - lo),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_batch": float(np.mean(batches)) if batches else None,
    }
