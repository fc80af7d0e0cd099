"""Load soak: many concurrent clients mixing generate and moderate against the shipped local app, bounded in time
and requests, stopping by itself. Reports throughput, latency percentiles, the status histogram and the replicas'
memory at the start and the end; every response is audited (see ``tests/reliability/load.py``).

``make soak`` (long: 64 clients, 5 minutes) runs ``python -m tests.reliability.soak``; the CI version is
``tests/integration/test_soak.py``. The app is ``deployments/configs/local.yaml`` with one change: the generator
queues at most ``GENERATOR_QUEUE`` requests, so overload is shed as 503 + Retry-After instead of unbounded waits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import encode, varied_images

from .apps import largest_replica, local_app, memory_growth, replica_memory, replicas, serve_config
from .load import LoadStats, generate_call, moderate_call, run_load

APP = "soak"
GENERATOR_QUEUE = 16  # generate requests waiting for the (single) generator replica beyond its 2 ongoing ones


def soak_config(port: int) -> dict[str, Any]:
    app = local_app(APP, f"/{APP}")
    for d in app["deployments"]:
        if d["name"] == "Generator":
            d["max_queued_requests"] = GENERATOR_QUEUE
    return serve_config(port, [app])


def mix(generate_share: float = 0.25) -> list:
    """Moderate one or two uploads; generate one or two 64x64 images in two steps."""
    pngs = [encode(img) for img in varied_images(16, seed=11)]
    path = f"/{APP}/v1"
    return [
        ((1 - generate_share) / 2, moderate_call(f"{path}/moderate", pngs, files=1)),
        ((1 - generate_share) / 2, moderate_call(f"{path}/moderate", pngs, files=2)),
        (generate_share / 2, generate_call(f"{path}/generate", num_images=1, steps=2)),
        (generate_share / 2, generate_call(f"{path}/generate", num_images=2, steps=2)),
    ]


def _replica_ids() -> dict[str, set[str]]:
    return {d: {r["replica_id"] for r in replicas(APP, d)} for d in ("Ingress", "Generator", "SafetyChecker")}


async def soak(
    base: str,
    clients: int = 64,
    duration_s: float = 300,
    max_requests: int = 1_000_000,
    warmup_s: float = 15,
    generate_share: float = 0.25,
    memory_every_s: float = 5,
) -> tuple[LoadStats, dict[str, Any]]:
    """Warm up at full concurrency (not counted: allocators and batch shapes settle), then soak for ``duration_s``
    sampling the replicas' memory every ``memory_every_s``."""
    calls = mix(generate_share)
    await run_load(base, calls, clients, warmup_s, max_requests)
    ids_start = await asyncio.to_thread(_replica_ids)
    memory = [(0.0, await asyncio.to_thread(replica_memory, APP))]
    done = asyncio.Event()

    async def sample() -> None:
        t0 = time.monotonic()
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), memory_every_s)
            except TimeoutError:
                memory.append((round(time.monotonic() - t0, 1), await asyncio.to_thread(replica_memory, APP)))

    sampler = asyncio.create_task(sample())
    stats = await run_load(base, calls, clients, duration_s, max_requests, seed=1)
    done.set()
    await sampler
    memory.append((round(stats.duration_s, 1), await asyncio.to_thread(replica_memory, APP)))
    ids_end = await asyncio.to_thread(_replica_ids)
    start, end = memory[0][1], memory[-1][1]
    half = next(m for t, m in memory if t >= stats.duration_s / 2)
    return stats, {
        "clients": clients,
        "generate_share": generate_share,
        "memory_mib_start": largest_replica(start),  # per replica
        "memory_mib_end": largest_replica(end),
        "memory_mib_growth": memory_growth(start, end),  # of a replica alive throughout
        "memory_mib_growth_second_half": memory_growth(half, end),
        "replicas_start": {d: len(m) for d, m in start.items()},
        "replicas_end": {d: len(m) for d, m in end.items()},
        "memory_timeline": [(t, largest_replica(m)) for t, m in memory],
        "replicas_replaced": {d: len(ids_start[d] - ids_end[d]) for d in ids_start},
        **stats.summary(),
    }


def main() -> None:
    import ray

    from tests.integration.conftest import free_port

    from .apps import apply

    parser = argparse.ArgumentParser(description="diffguard load soak (loopback only, bounded)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=300)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        port = free_port()
        apply(soak_config(port))
        started = time.monotonic()
        stats, figures = asyncio.run(soak(f"http://127.0.0.1:{port}", args.clients, args.duration_s, args.max_requests))
        from pipeline import SafetyChecker

        figures["verified_images"] = verify(stats, SafetyChecker.load("tiny", "cpu", "float32"))
        figures["unchecked_images_out"] = stats.unchecked_images_out
        figures["seconds"] = round(time.monotonic() - started, 1)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    text = json.dumps(figures, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


def verify(stats: LoadStats, checker: Any) -> int:
    from .load import verify_samples

    return verify_samples(stats, checker)


if __name__ == "__main__":
    main()
