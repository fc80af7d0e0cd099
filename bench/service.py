"""``/v1/moderate`` on a locally deployed app (moderation only, ViT-B/32-sized checker), batching on and off.

Both variants are deployed at once as two Serve applications of the shipped local config (``/batched`` with the
config's ``max_batch_size``, ``/unbatched`` with ``max_batch_size: 1``), each with one checker replica, and driven
one after the other with :mod:`bench.load`. The core's own throughput at the mean observed batch size is measured
in this process right after, on the same PNGs, with the same dtype, from bytes to verdicts.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deployments.run import DEFAULT_CONFIG, config_schema, deploy

from . import models
from .core import bytes_rates
from .load import run_handle_load, run_load

log = logging.getLogger("bench")

CHECKER_DTYPE = "auto"  # what a user gets: bfloat16 on CPUs with native bf16, else float32


@dataclass(frozen=True)
class ServicePlan:
    clients: tuple[int, ...]
    warmup_s: float
    measure_s: float
    images: int = 64  # distinct PNGs the clients cycle through
    size: int = 512  # Stable Diffusion 1.x output size
    torch_threads: int | None = None  # the checker's `threads` (None: the shipped config's)
    default_threads_clients: tuple[int, ...] = ()  # also drive a batched replica with Ray's defaults (before)
    handle_clients: tuple[int, ...] = ()  # also drive the batched checker through its handle (no HTTP)


def serve_config(port: int, checker_dir: Path, plan: ServicePlan) -> dict[str, Any]:
    """The shipped local config with the bench checker, no generator, one checker replica per variant."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["http_options"]["port"] = port
    base = raw["applications"][0]
    batch = next(d for d in base["deployments"] if d["name"] == "SafetyChecker")["user_config"]["max_batch_size"]
    threads = plan.torch_threads or base["args"]["checker"].get("threads")
    variants = [("batched", batch, threads), ("unbatched", 1, threads)]
    if plan.default_threads_clients:
        variants.append(("batched-ray-defaults", batch, None))
    apps = []
    for name, max_batch, variant_threads in variants:
        app = copy.deepcopy(base)
        app.update(name=name, route_prefix=f"/{name}")
        checker = {"model": str(checker_dir), "device": "cpu", "dtype": CHECKER_DTYPE, "threads": variant_threads}
        app["args"]["checker"] = checker
        app["args"]["generator"] = None
        app["deployments"] = [d for d in app["deployments"] if d["name"] != "Generator"]
        for d in app["deployments"]:
            if d["name"] == "SafetyChecker":
                d["user_config"].update(max_batch_size=max_batch, policy="stock")
                d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
                if name == "batched-ray-defaults":  # 1 torch thread, spinning OpenMP waits: before the config's tuning
                    d["ray_actor_options"].pop("runtime_env", None)
        apps.append(app)
    raw["applications"] = apps
    return raw


def run_service(plan: ServicePlan, port: int) -> dict[str, Any]:
    """Deploy, drive each variant at each concurrency, then measure the core at the observed batch sizes."""
    from ray import serve

    checker_dir = models.model_dir("vit-b-32")
    raw = serve_config(port, checker_dir, plan)
    deploy(config_schema(raw), timeout_s=600)
    bodies = models.pngs(models.images(plan.images, seed=3, size=plan.size))
    rows, window = [], (plan.warmup_s, plan.measure_s)
    try:
        for app in raw["applications"]:
            url = f"http://127.0.0.1:{port}{app['route_prefix']}/v1/moderate"
            run_load(url, bodies[:4], 1, 0.5, 0.5)  # first requests: connection set-up, lazy initialisation
            levels = plan.default_threads_clients if app["name"] == "batched-ray-defaults" else plan.clients
            for clients in levels:
                row = {"variant": app["name"], **run_load(url, bodies, clients, *window)}
                rows.append(row)
                log.info("service %s", row)
            if app["name"] == "batched":  # the checker replica alone: what the HTTP front costs on shared cores
                handle = serve.get_deployment_handle("SafetyChecker", app_name=app["name"])
                for clients in plan.handle_clients:
                    row = {"variant": "batched-handle", **run_handle_load(handle, bodies, clients, *window)}
                    rows.append(row)
                    log.info("service %s", row)
    finally:
        serve.shutdown()
    core = bytes_rates(checker_dir, CHECKER_DTYPE, bodies, sorted({max(1, round(r["mean_batch"] or 1)) for r in rows}))
    for r in rows:
        b = max(1, round(r["mean_batch"] or 1))
        r["core_images_per_s"] = core[b]
        r["x_core"] = r["images_per_s"] / core[b]
    by = {(r["variant"], r["clients"]): r["images_per_s"] for r in rows}
    for r in rows:
        if r["variant"] == "batched":
            r["x_unbatched"] = r["images_per_s"] / by[("unbatched", r["clients"])]
    return {
        "model": "ViT-B/32",
        "dtype": CHECKER_DTYPE,
        "image": f"{plan.size}x{plan.size} PNG, one per request (raw body)",
        "checker_torch_threads": raw["applications"][0]["args"]["checker"]["threads"],
        "rows": rows,
        "core_images_per_s": core,
    }
