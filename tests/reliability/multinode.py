"""A simulated multi-node cluster (``ray.cluster_utils.Cluster``): a CPU head and worker nodes advertising logical
GPUs, running the production-shaped Serve config with tiny models. Under sustained load the checker scales up from
``min_replicas`` and back down once the load stops; every response is audited throughout.

Runs in its own process (one Ray per process; the test session has its own)::

    python -m tests.reliability.multinode --out result.json [--load-s 40] [--max-replicas 4]

What is changed from ``deployments/configs/production.yaml`` and why: tiny models on the CPU (no real GPU here; the
``num_gpus`` reservations are kept, so placement is real), a single HTTP proxy on the head (every simulated node
shares one machine and one port), smaller CPU reservations (two logical CPUs per node), and short autoscaling delays
plus a long batch wait, so that load turns into queued checker requests within seconds; no audit log (production's
writes to a bucket this machine has none of).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT, encode, varied_images

PRODUCTION = ROOT / "deployments" / "configs" / "production.yaml"
TINY = {"model": "tiny", "device": "cpu", "dtype": "float32"}


def cluster_config(port: int, max_replicas: int = 4) -> dict[str, Any]:
    """production.yaml with the changes listed in the module docstring; GPU reservations untouched."""
    raw = copy.deepcopy(yaml.safe_load(PRODUCTION.read_text()))
    raw["proxy_location"] = "HeadOnly"
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    raw["logging_config"] = {"encoding": "TEXT", "log_level": "WARNING"}
    app = raw["applications"][0]
    app["args"]["checker"] = dict(TINY)
    app["args"]["generator"] = dict(TINY)
    app["args"]["ingress"].pop("audit_dest", None)
    deployments = {d["name"]: d for d in app["deployments"]}
    deployments["Ingress"]["ray_actor_options"]["num_cpus"] = 0.25
    deployments["Ingress"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    deployments["Generator"]["ray_actor_options"]["num_cpus"] = 0.25
    deployments["Generator"]["autoscaling_config"].update(max_replicas=1)
    checker = deployments["SafetyChecker"]
    checker["ray_actor_options"]["num_cpus"] = 0.25
    checker["user_config"].update(max_batch_size=64, batch_wait_timeout_s=0.5)  # queued requests linger
    checker["autoscaling_config"] = {
        "min_replicas": 1,
        "max_replicas": max_replicas,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 2,
        "downscale_delay_s": 6,
        "metrics_interval_s": 1,
        "look_back_period_s": 3,
    }
    return raw


def start_cluster(workers: int = 2, gpus_per_worker: int = 2) -> Any:
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.pop("RAY_ADDRESS", None)
    common = {"object_store_memory": 200 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, **common},
    )
    for _ in range(workers):
        cluster.add_node(num_cpus=2, num_gpus=gpus_per_worker, **common)
    cluster.wait_for_nodes()
    cluster.connect(namespace="serve")
    return cluster


def placement() -> dict[str, Any]:
    """Where each deployment's replicas run, and what the cluster reports as used GPUs."""
    import ray

    from .apps import details

    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    gpu_nodes = {nid for nid, n in nodes.items() if n["Resources"].get("GPU", 0) > 0}
    deployments = details()["applications"]["diffguard"]["deployments"]
    out: dict[str, Any] = {"nodes": len(nodes), "gpu_nodes": len(gpu_nodes)}
    for name, d in deployments.items():
        running = [r for r in d["replicas"] if r["state"] == "RUNNING"]
        out[name] = {
            "replicas": len(running),
            "on_gpu_nodes": sum(r["node_id"] in gpu_nodes for r in running),
            "gpus_per_replica": d["deployment_config"]["ray_actor_options"].get("num_gpus", 0),
        }
    total, free = ray.cluster_resources(), ray.available_resources()
    out["gpus_total"] = total.get("GPU", 0)
    out["gpus_in_use"] = round(total.get("GPU", 0) - free.get("GPU", 0), 3)
    return out


class Sampler(threading.Thread):
    """Every ``interval_s``: the checker's running replica count, as (seconds since start, count)."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.samples, self.t0 = interval_s, [], time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        from .apps import replicas

        while not self._stop_event.is_set():
            try:
                n = len(replicas("diffguard", "SafetyChecker"))
                self.samples.append((round(time.monotonic() - self.t0, 1), n))
            except Exception:  # noqa: BLE001 - the controller may be busy; skip a sample
                pass
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def now(self) -> float:
        return time.monotonic() - self.t0


def run(
    load_s: float = 40,
    clients: int = 16,
    max_replicas: int = 4,
    downscale_timeout_s: float = 180,
    scale_up_timeout_s: float = 240,
) -> dict:
    from ray import serve

    from tests.integration.conftest import free_port

    from .apps import apply
    from .load import LoadStats, disallowed, generate_call, moderate_call, run_load, verify_samples

    started = time.monotonic()
    cluster = start_cluster()
    try:
        port = free_port()
        apply(cluster_config(port, max_replicas), timeout_s=900)
        base = f"http://127.0.0.1:{port}"
        before = placement()
        pngs = [encode(img) for img in varied_images(8, seed=5)]
        heavy = [(9.0, moderate_call("/v1/moderate", pngs, files=1)), (1.0, generate_call("/v1/generate"))]
        light = [(1.0, moderate_call("/v1/moderate", pngs, files=1)), (1.0, generate_call("/v1/generate"))]
        sampler = Sampler()
        sampler.start()
        stats = LoadStats()

        async def load_until_scaled_up() -> None:
            # at least load_s of load, and on until a second replica is RUNNING (a slow machine may take longer than
            # load_s to start one): the peak snapshot must see the scaled-up deployment, not one still starting
            stop = asyncio.Event()
            task = asyncio.create_task(
                run_load(base, heavy, clients, scale_up_timeout_s, 100_000, stats=stats, stop=stop)
            )
            while not task.done():
                if sampler.now() >= load_s and any(n > 1 for _, n in sampler.samples):
                    break
                await asyncio.sleep(0.5)
            stop.set()
            await task

        asyncio.run(load_until_scaled_up())
        load_end = sampler.now()
        peak = placement()
        trickle = LoadStats()  # one client keeps requests flowing while replicas are removed

        async def scale_down() -> float | None:
            stop = asyncio.Event()
            task = asyncio.create_task(run_load(base, light, 1, downscale_timeout_s, 100_000, stats=trickle, stop=stop))
            t = None
            while sampler.now() - load_end < downscale_timeout_s:
                if sampler.samples and sampler.samples[-1][0] > load_end and sampler.samples[-1][1] == 1:
                    t = sampler.now() - load_end
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)  # a few more requests on the scaled-down deployment
            stop.set()
            await task
            return t

        down_after = asyncio.run(scale_down())
        sampler.stop()
        after = placement()
        from pipeline import SafetyChecker

        checker = SafetyChecker.load("tiny", "cpu", "float32")
        verified = verify_samples(stats, checker) + verify_samples(trickle, checker)
        counts = [n for _, n in sampler.samples]
        up_at = next((t for t, n in sampler.samples if n > 1), None)
        return {
            "placement_start": before,
            "placement_peak": peak,
            "placement_end": after,
            "min_replicas": 1,
            "max_replicas": max_replicas,
            "peak_replicas": max(counts, default=0),
            "first_scale_up_s": up_at,
            "scaled_down_to_min_after_load_s": None if down_after is None else round(down_after, 1),
            "replica_timeline": sampler.samples,
            "load": stats.summary(),
            "load_disallowed": disallowed(stats, {"200"}),
            "trickle": trickle.summary(),
            "trickle_disallowed": disallowed(trickle, {"200"}),
            "verified_images": verified,
            "unchecked_images_out": stats.unchecked_images_out + trickle.unchecked_images_out,
            "problems": stats.problems + trickle.problems,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="write the result JSON here")
    parser.add_argument("--load-s", type=float, default=40, help="seconds of sustained load")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients during the load")
    parser.add_argument("--max-replicas", type=int, default=4, help="the checker's max_replicas")
    args = parser.parse_args()
    result = run(args.load_s, args.clients, args.max_replicas)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
