"""A simulated multi-node cluster (``ray.cluster_utils.Cluster``): a CPU head and worker nodes labelled, as the
KubeRay worker groups label theirs, ``diffguard.io/pool=generation`` or ``=checking``, both advertising logical GPUs
(as ``ray start --num-gpus --labels`` would), running the production-shaped Serve config with tiny models. Under
sustained load the checker scales up from ``min_replicas`` and back down once the load stops; every response is
audited throughout, and each replica's node pool is recorded at the start, at the peak and at the end.

The generation node has GPUs to spare beyond its Generators, enough for every checker at ``max_replicas``, and the
checking node a whole free GPU beyond its checkers: only production.yaml's ``label_selector`` keeps each kind of
replica in its own pool (Serve spreads replicas across nodes by default), so the placement can be seen to fail.

Runs in its own process (one Ray per process; the test session has its own)::

    python -m tests.reliability.multinode --out result.json [--load-s 40] [--max-replicas 4]

What is changed from ``deployments/configs/production.yaml`` and why: tiny models on the CPU (no real GPU here; the
``num_gpus`` reservations and ``label_selector`` are kept, so placement is real), a single HTTP proxy on the head
(every simulated node shares one machine and one port), smaller CPU reservations (two logical CPUs per node), one
Ingress replica (the proxy's only target here; it needs no GPU and no pool), the Generator held at its
``min_replicas`` (the load is mostly moderation), and short autoscaling delays plus a long batch wait for the
checker, so that load turns into queued checker requests within seconds; no audit log (production's writes to a
bucket this machine has none of).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT, encode, varied_images

PRODUCTION = ROOT / "deployments" / "configs" / "production.yaml"
TINY = {"model": "tiny", "device": "cpu", "dtype": "float32"}
POOL = "diffguard.io/pool"  # the Ray node label the KubeRay worker groups set (k8s/)
POOLS = {"Generator": "generation", "SafetyChecker": "checking"}  # deployment -> the pool production.yaml selects


def cluster_config(port: int, max_replicas: int = 4) -> dict[str, Any]:
    """production.yaml with the changes listed in the module docstring; GPU reservations and label selectors untouched.

    Raises ``ValueError`` where production.yaml does not select the pools this cluster labels: the run proves
    production's own selectors, it never supplies them.
    """
    raw = copy.deepcopy(yaml.safe_load(PRODUCTION.read_text()))
    raw["proxy_location"] = "HeadOnly"
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    raw["logging_config"] = {"encoding": "TEXT", "log_level": "WARNING"}
    app = raw["applications"][0]
    app["args"]["checker"] = dict(TINY)
    app["args"]["generator"] = dict(TINY)
    app["args"]["ingress"].pop("audit_dest", None)
    deployments = {d["name"]: d for d in app["deployments"]}
    for name, pool in POOLS.items():
        selector = deployments[name]["ray_actor_options"].get("label_selector")
        if selector != {POOL: pool}:
            raise ValueError(
                f"{PRODUCTION}: {name}'s ray_actor_options.label_selector is {selector!r}; "
                f"this cluster's nodes are labelled for {{{POOL!r}: {pool!r}}}"
            )
    deployments["Ingress"]["ray_actor_options"]["num_cpus"] = 0.25
    deployments["Ingress"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    generator = deployments["Generator"]
    generator["ray_actor_options"]["num_cpus"] = 0.25
    generator["autoscaling_config"].update(max_replicas=generator["autoscaling_config"]["min_replicas"])
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


def start_cluster(generation_gpus: int, checking_gpus: int) -> Any:
    """A CPU head with no pool label, one generation node and one checking node with the given logical GPUs."""
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.pop("RAY_ADDRESS", None)
    common = {"object_store_memory": 200 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, **common},
    )
    for pool, gpus in (("generation", generation_gpus), ("checking", checking_gpus)):
        cluster.add_node(num_cpus=2, num_gpus=gpus, labels={POOL: pool}, **common)
    cluster.wait_for_nodes()
    cluster.connect(namespace="serve")
    return cluster


def placement() -> dict[str, Any]:
    """Where each deployment's replicas run (the pool label of each one's node), and the GPUs the cluster reports as
    used, in all and per pool. A replica still starting or stopping holds its share but is not counted as running."""
    import ray
    from ray._private.state import available_resources_per_node  # a DeveloperAPI: each node's free resources

    from .apps import details

    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    pool_of = {nid: (n.get("Labels") or {}).get(POOL) for nid, n in nodes.items()}
    free = available_resources_per_node()
    pools: dict[str, dict[str, float]] = {}
    for nid, n in nodes.items():
        p = pools.setdefault(pool_of[nid] or "unlabelled", {"nodes": 0, "gpus_total": 0.0, "gpus_in_use": 0.0})
        gpus = n["Resources"].get("GPU", 0)
        p["nodes"] += 1
        p["gpus_total"] += gpus
        p["gpus_in_use"] = round(p["gpus_in_use"] + gpus - free.get(nid, {}).get("GPU", 0), 3)
    deployments = details()["applications"]["diffguard"]["deployments"]
    out: dict[str, Any] = {
        "nodes": len(nodes),
        "gpu_nodes": sum(n["Resources"].get("GPU", 0) > 0 for n in nodes.values()),
    }
    out["pools"] = pools
    for name, d in deployments.items():
        options = d["deployment_config"]["ray_actor_options"]
        running = [r for r in d["replicas"] if r["state"] == "RUNNING"]
        out[name] = {
            "replicas": len(running),
            "pools": sorted(str(pool_of.get(r["node_id"])) for r in running),  # "None": a node with no pool label
            "not_running": sorted(r["state"] for r in d["replicas"] if r["state"] != "RUNNING"),
            "gpus_per_replica": options.get("num_gpus", 0),
            "label_selector": options.get("label_selector"),
        }
    total, free_all = ray.cluster_resources(), ray.available_resources()
    out["gpus_total"] = total.get("GPU", 0)
    out["gpus_in_use"] = round(total.get("GPU", 0) - free_all.get("GPU", 0), 3)
    return out


def settled(timeout_s: float = 90) -> None:
    """Wait until every replica is RUNNING (none starting or stopping), so GPU accounting matches running replicas."""
    from .apps import details, wait_for

    def all_running() -> bool:
        deployments = details()["applications"]["diffguard"]["deployments"].values()
        return all(r["state"] == "RUNNING" for d in deployments for r in d["replicas"])

    wait_for("every replica RUNNING", all_running, timeout_s, interval_s=0.5)


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
    port = free_port()
    config = cluster_config(port, max_replicas)  # refuses a production.yaml without the pools' selectors, first
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    generators = deployments["Generator"]["autoscaling_config"]["min_replicas"]
    generator_gpus = deployments["Generator"]["ray_actor_options"]["num_gpus"]
    checker_gpus = deployments["SafetyChecker"]["ray_actor_options"]["num_gpus"]
    checkers_at_peak = math.ceil(max_replicas * checker_gpus)  # GPUs every checker at max_replicas needs
    # each pool has room for the other's replicas: generation for every checker, checking for one more Generator
    cluster = start_cluster(
        generation_gpus=math.ceil(generators * generator_gpus) + checkers_at_peak,
        checking_gpus=checkers_at_peak + math.ceil(generator_gpus),
    )
    try:
        apply(config, timeout_s=900)
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
        settled()  # a removed replica gives its GPU share back once stopped
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
            "generators": generators,
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
