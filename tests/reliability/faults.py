"""Fault injection on the Serve endpoint, each under concurrent load: replicas killed, a raising checker, a checker
slower than its timeout, a checker absent at start-up. Every driver returns measured figures; callers assert them.

Apps (see :func:`fault_apps`): ``kill`` (the real tiny checker, one replica, instant fake generator), ``raising``
and ``slow`` (fault stand-ins from ``tests/fakes.py``), ``busy`` (a generator that takes 2 s a render, so its two
ongoing slots stay held), ``absent`` (the real checker behind a gate file).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.conftest import encode, varied_images

from .apps import app, kill_replica, replicas, wait_for
from .load import LoadStats, failures_after, generate_call, moderate_call, run_load

SETTLE_S = 1.0  # after a replacement replica runs, routers learn of it within this; later requests must succeed
PNGS = [encode(img) for img in varied_images(8, seed=3)]


def fault_apps(gate: Path | None = None) -> list[dict[str, Any]]:
    """The fault-injection applications; ``gate`` adds ``absent`` (deploy it without waiting)."""
    apps = [
        app("kill", ingress={"checker_timeout_s": 10, "generator_timeout_s": 10, "health_timeout_s": 2}),
        app("raising", checker={"factory": "tests.fakes:RaisingChecker"}),
        app("slow", checker={"factory": "tests.fakes:SlowChecker"}, ingress={"checker_timeout_s": 1.0}),
    ]
    apps.append(app("busy", generator={"factory": "tests.fakes:SlowGenerator"}, ingress={"generator_timeout_s": 300}))
    if gate is not None:
        env = {"runtime_env": {"env_vars": {"DIFFGUARD_TEST_GATE": str(gate)}}, "num_cpus": 0.05}
        apps.append(
            app(
                "absent",
                checker={"factory": "tests.fakes:gated_checker"},
                ingress={"checker_timeout_s": 2, "health_timeout_s": 1},
                checker_options={"ray_actor_options": env},
            )
        )
    return apps


def mix(name: str) -> list:
    """Half generate (two images each), half moderate (two uploads each)."""
    return [
        (1.0, generate_call(f"/{name}/v1/generate", num_images=2)),
        (1.0, moderate_call(f"/{name}/v1/moderate", PNGS, files=2)),
    ]


def _now(stats: LoadStats) -> float:
    return time.monotonic() - stats.t0


async def kill_during_load(
    base: str,
    app_name: str,
    deployment: str,
    clients: int = 8,
    warmup_s: float = 3.0,
    after_s: float = 5.0,
    timeout_s: float = 120.0,
    max_requests: int = 20_000,
) -> tuple[LoadStats, dict[str, Any]]:
    """Kill one replica of ``deployment`` mid-load; keep the load on until Serve runs a replacement and ``after_s``
    more seconds have passed."""
    stats, stop = LoadStats(), asyncio.Event()
    load = asyncio.create_task(
        run_load(base, mix(app_name), clients, warmup_s + timeout_s + after_s, max_requests, stats=stats, stop=stop)
    )
    await asyncio.sleep(warmup_s)
    before = {r["replica_id"] for r in await asyncio.to_thread(replicas, app_name, deployment)}
    victim = await asyncio.to_thread(kill_replica, app_name, deployment)
    injected = _now(stats)

    def replaced() -> bool:
        return any(r["replica_id"] not in before for r in replicas(app_name, deployment))

    try:
        await asyncio.to_thread(wait_for, f"a replacement {deployment} replica", replaced, timeout_s)
        running = _now(stats)
    except TimeoutError:
        running = None
    await asyncio.sleep(after_s)
    stop.set()
    await load
    later = [o for o in stats.outcomes if running is not None and o.start >= running + SETTLE_S]
    return stats, {
        "scenario": f"{deployment} replica killed (ray.kill) under load",
        "killed": victim["actor_name"],
        "injected_at_s": round(injected, 2),
        "replacement_running_after_s": None if running is None else round(running - injected, 2),
        "after_injection": failures_after(stats, injected),
        "after_recovery": {"requests": len(later), "non_200": sum(o.status != "200" for o in later)},
        **stats.summary(),
    }


async def broken_checker_load(
    base: str, app_name: str, clients: int = 8, duration_s: float = 8.0, max_requests: int = 400
) -> tuple[LoadStats, dict[str, Any]]:
    """Load against an app whose checker always fails (raises, or answers after the ingress's timeout)."""
    stats = await run_load(base, mix(app_name), clients, duration_s, max_requests)
    slowest = max((o.end - o.start for o in stats.outcomes), default=0.0)
    return stats, {"scenario": f"checker {app_name}", "slowest_s": round(slowest, 2), **stats.summary()}


async def absent_checker(
    base: str, gate: Path, clients: int = 4, duration_s: float = 6.0, timeout_s: float = 300.0
) -> tuple[LoadStats, dict[str, Any]]:
    """While the ``absent`` app's checker has no ready replica: /healthz is not ready and every generate/moderate is
    refused (503). Then the gate opens and the app must become ready by itself."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def health() -> httpx.Response:
            return await client.get("/absent/healthz")

        start = time.monotonic()
        while True:  # the ingress answers first (with the checker still missing)
            try:
                first = await health()
                if first.status_code in (200, 503) and "deployments" in first.text:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > timeout_s:
                raise TimeoutError("the absent app's ingress never answered")
            await asyncio.sleep(0.5)
        stats = await run_load(base, mix("absent"), clients, duration_s, 200)
        during = await health()
        gate.touch()
        opened = time.monotonic()
        while (await health()).status_code != 200:
            if time.monotonic() - opened > timeout_s:
                raise TimeoutError("the checker did not become ready after its gate opened")
            await asyncio.sleep(0.25)
        ready_after = time.monotonic() - opened
        after = [await client.post("/absent/v1/moderate", files={"files": ("a.png", PNGS[0], "image/png")})]
        after.append(await client.post("/absent/v1/generate", json={"prompt": "a", "seed": 1, "num_images": 1}))
    return stats, {
        "scenario": "checker absent at start-up",
        "healthz_before": [first.status_code, first.json()],
        "healthz_during": [during.status_code, during.json()],
        "ready_after_gate_s": round(ready_after, 2),
        "after_ready": [r.status_code for r in after],
        "after_ready_bodies": [r.json() for r in after],
        **stats.summary(),
    }


async def healthz_under_generation_load(
    base: str,
    app_name: str = "busy",
    clients: int = 8,
    duration_s: float = 10.0,
    probe_every_s: float = 0.1,
    probe_timeout_s: float = 5.0,
) -> tuple[LoadStats, dict[str, Any]]:
    """``clients`` generate loops keep the generator's ongoing slots full (and its queue non-empty) while a prober
    asks ``/healthz`` every ``probe_every_s``; each probe's status and latency are recorded (a probe that does not
    answer within ``probe_timeout_s`` counts as a transport failure)."""
    stop = asyncio.Event()
    calls = [(1.0, generate_call(f"/{app_name}/v1/generate", num_images=1))]
    load = asyncio.create_task(run_load(base, calls, clients, duration_s + 10, 100_000, stop=stop))
    probes: list[tuple[str, float]] = []
    async with httpx.AsyncClient(base_url=base, timeout=probe_timeout_s) as client:
        await asyncio.sleep(min(3.0, duration_s / 3))  # the renders are in flight and queued first
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                status = str((await client.get(f"/{app_name}/healthz")).status_code)
            except httpx.HTTPError as exc:
                status = f"transport:{type(exc).__name__}"
            probes.append((status, time.monotonic() - start))
            await asyncio.sleep(max(0.0, probe_every_s - (time.monotonic() - start)))
    stop.set()
    stats = await load
    latencies = sorted(t for s, t in probes if s == "200")

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies, q)) * 1000, 1) if latencies else None

    return stats, {
        "scenario": "/healthz under full generation load",
        "probes": len(probes),
        "probe_statuses": dict(sorted(Counter(s for s, _ in probes).items())),
        "healthz_p50_ms": pct(50),
        "healthz_p99_ms": pct(99),
        "healthz_max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "generate_statuses": stats.statuses("generate"),
        "generate_p50_s": stats.summary()["p50_s"],
    }
