"""Serve apps for the reliability runs: configs derived from ``deployments/configs``, deployed through the same
file -> schema -> controller path as ``diffguard serve``, and the replicas behind them (found, killed, measured)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import yaml

from deployments.run import DEFAULT_CONFIG, config_schema, deploy

LIGHT = {"ray_actor_options": {"num_cpus": 0.05}}  # logical CPUs: many small apps fit the 2-CPU test cluster
ONE = {"min_replicas": 1, "max_replicas": 1}
FAKE_GENERATOR = {"factory": "tests.fakes:FakeGenerator"}  # instant random pixels (the checker is what is under test)
TINY = {"model": "tiny", "device": "cpu", "dtype": "float32"}


def serve_config(port: int, apps: list[dict[str, Any]]) -> dict[str, Any]:
    """The local config's HTTP, proxy and logging settings with the given applications."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["http_options"].update(host="127.0.0.1", port=port)
    raw["applications"] = apps
    return raw


def local_app(name: str = "diffguard", route_prefix: str = "/") -> dict[str, Any]:
    """The shipped local application (tiny models, CPU), as ``diffguard serve`` deploys it."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    main = copy.deepcopy(raw["applications"][0])
    main.update(name=name, route_prefix=route_prefix)
    return main


def app(
    name: str,
    *,
    checker: dict[str, Any] | None = None,
    generator: dict[str, Any] | None = FAKE_GENERATOR,
    ingress: dict[str, Any] | None = None,
    checker_options: dict[str, Any] | None = None,
    generator_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
    health_check_period_s: float = 1.0,
) -> dict[str, Any]:
    """One ``deployments.app:build_app`` application under ``/<name>`` with small CPU reservations.

    ``checker``/``generator``/``ingress`` are the builder's args; ``*_options`` merge into each deployment's config.
    A short health-check period lets Serve notice a killed replica quickly.
    """
    health = {"health_check_period_s": health_check_period_s, "health_check_timeout_s": 10}
    deployments = [
        {"name": "Ingress", **LIGHT, **(ingress_options or {})},
        {"name": "SafetyChecker", **LIGHT, **health, "autoscaling_config": ONE, **(checker_options or {})},
    ]
    args: dict[str, Any] = {"checker": checker or TINY, "ingress": ingress or {}, "generator": generator}
    if generator is not None:
        deployments.append(
            {"name": "Generator", **LIGHT, **health, "autoscaling_config": ONE, **(generator_options or {})}
        )
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "deployments.app:build_app",
        "args": args,
        "deployments": deployments,
    }


def apply(raw: dict[str, Any], wait: bool = True, timeout_s: float = 600) -> None:
    """Deploy a config; with ``wait=False`` return as soon as the controller accepted it."""
    schema = config_schema(raw)
    if wait:
        deploy(schema, timeout_s=timeout_s)
        return
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    _get_global_client().deploy_apps(schema, _blocking=False)


def details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def replicas(app_name: str, deployment: str, state: str | None = "RUNNING") -> list[dict[str, Any]]:
    """The deployment's replicas (actor name, pid, node id, state) as the controller reports them."""
    apps = details().get("applications", {})
    found = apps.get(app_name, {}).get("deployments", {}).get(deployment, {}).get("replicas", [])
    return [r for r in found if state is None or r["state"] == state]


def kill_replica(app_name: str, deployment: str) -> dict[str, Any]:
    """``ray.kill`` one running replica of the deployment (no restart by Ray: Serve must replace it)."""
    import ray

    running = replicas(app_name, deployment)
    if not running:
        raise RuntimeError(f"{app_name}/{deployment} has no running replica to kill")
    victim = running[0]
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    return victim


def rss_mib(pids: list[int]) -> dict[int, float]:
    """Resident memory of processes on this machine, in MiB (absent processes are left out)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return out


def replica_memory(app_name: str) -> dict[str, dict[str, float]]:
    """Resident memory of each deployment's running replicas, by replica id, in MiB."""
    deployments = details()["applications"][app_name]["deployments"]
    out = {}
    for name, d in deployments.items():
        running = {r["pid"]: r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING" and r.get("pid")}
        out[name] = {running[pid]: round(mib, 1) for pid, mib in rss_mib(list(running)).items()}
    return out


def memory_growth(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per deployment, the largest growth of one replica alive at both moments (autoscaling adds and removes
    replicas; a new replica's whole footprint is not growth)."""
    return {
        d: round(max((after[d][r] - before[d][r] for r in before[d].keys() & after.get(d, {}).keys()), default=0.0), 1)
        for d in before
    }


def largest_replica(memory: dict[str, dict[str, float]]) -> dict[str, float]:
    return {d: max(by_replica.values(), default=0.0) for d, by_replica in memory.items()}


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Raises ``TimeoutError`` naming ``what``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:g}s")
        time.sleep(interval_s)
    return time.monotonic() - start
