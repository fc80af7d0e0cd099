"""Head loss and a node drain, for real, on one machine: a GCS-fault-tolerant cluster of ``ray start`` processes
(GCS state in a loopback ``redis-server``), the production-shaped Serve config with tiny models, and HTTP load on a
WORKER node's Serve proxy throughout.

1. Head loss: SIGKILL every head process (GCS, raylet, agents, Serve controller, the head's proxy) under load, start
   the head again on the same Redis and port; the worker's proxy keeps answering, the controller recovers the
   running application (the same replica actors before and after: nothing redeployed).
2. Drain: ``python -m k8s.prestop`` on the node holding the SafetyChecker, under load: the replica moves to the other
   checking node, in-flight requests finish, the hook returns before its deadline.

Every response is audited (``load.audit``); a prober compares every /v1/moderate verdict with the in-process checker's
on the same PNG, so a 200 cannot carry a score the checker did not produce.

    python -m tests.reliability.head_loss --out result.json

Changed from ``deployments/configs/production.yaml`` and why: tiny models on the CPU (GPUs are logical, ``ray start
--num-gpus``; the reservations are kept so placement is real), small CPU reservations, fixed replica counts
(``min_replicas`` of production, no autoscaling, so "same replicas" means something), no audit log; proxies listen on
loopback, a port per node (``RAY_SERVE_WORKER_PROXY_HTTP_PORT``: every node shares this machine's IP). The label
selectors and graceful shutdowns are production's own (k8s/grace.py derives the latter). The QuotaKeeper asks for a
hundredth of a CPU (deployments/quota.py), so it lives on a worker: with 0, as it first had, it landed on the head
(0 CPUs, as on KubeRay), died with it, and the controller did not report the app RUNNING again within minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from tests.conftest import ROOT, encode, varied_images
from tests.integration.conftest import free_port

from .raycluster import LocalCluster

PRODUCTION = ROOT / "deployments" / "configs" / "production.yaml"
TINY = {"model": "tiny", "device": "cpu", "dtype": "float32"}
POOLS = {"Generator": "generation", "SafetyChecker": "checking"}  # the contract's node labels
LABEL = "diffguard.io/pool"


def serve_config(port: int) -> dict[str, Any]:
    raw = copy.deepcopy(yaml.safe_load(PRODUCTION.read_text()))
    assert raw["proxy_location"] == "EveryNode", "production runs a proxy on every node; this test relies on it"
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    raw["logging_config"] = {"encoding": "TEXT", "log_level": "WARNING"}
    app = raw["applications"][0]
    app["args"].update(checker=dict(TINY), generator=dict(TINY))
    app["args"]["ingress"].pop("audit_dest", None)
    for d in app["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.1
        selector = d["ray_actor_options"].get("label_selector")
        if d["name"] in POOLS and selector != {LABEL: POOLS[d["name"]]}:
            raise ValueError(f"{PRODUCTION}: {d['name']} selects {selector!r}, not {LABEL}={POOLS[d['name']]}")
        if "graceful_shutdown_timeout_s" not in d:
            raise ValueError(f"{PRODUCTION}: {d['name']} has no graceful_shutdown_timeout_s (k8s/grace.py)")
        n = d["autoscaling_config"]["min_replicas"]
        d.pop("autoscaling_config")
        d["num_replicas"] = n
    return raw


def connect(address: str) -> None:
    import ray
    from ray.serve import context

    context._set_global_client(None)  # a reconnect after the head came back must not reuse the old controller handle
    ray.init(address=address, namespace="serve", log_to_driver=False)


def disconnect() -> None:
    import ray

    ray.shutdown()


def snapshot() -> dict[str, list[dict[str, Any]]]:
    from .apps import details

    deployments = details()["applications"]["diffguard"]["deployments"]
    keep = ("actor_id", "actor_name", "node_id", "state")
    return {name: [{k: r.get(k) for k in keep} for r in d["replicas"]] for name, d in deployments.items()}


def last_snapshot() -> dict[str, list[dict[str, Any]]]:
    """The snapshot, or ``{}`` when the controller does not answer (the result then says so)."""
    try:
        return snapshot()
    except Exception:  # noqa: BLE001
        return {}


def node_pools() -> dict[str, str]:
    import ray

    return {n["NodeID"]: n.get("Labels", {}).get(LABEL, "head") for n in ray.nodes() if n["Alive"]}


class Prober(threading.Thread):
    """One client posting each PNG in turn to /v1/moderate: every 200's verdict must be the in-process one."""

    def __init__(self, base: str, pngs: list[bytes], expected: list[list[float]], now: Callable[[], float]):
        super().__init__(daemon=True)
        self.base, self.pngs, self.expected = base, pngs, expected
        self.statuses: dict[str, int] = {}
        self.verified = self.mismatched = 0
        self.ends: list[float] = []  # when each answer came, on the load's clock
        self.now = now
        self.stop_event = threading.Event()

    def run(self) -> None:
        from .load import TOL

        i = 0
        with httpx.Client(base_url=self.base, timeout=120) as c:
            while not self.stop_event.is_set():
                k = i % len(self.pngs)
                i += 1
                try:
                    r = c.post("/v1/moderate", files=[("files", (f"p{i}.png", self.pngs[k], "image/png"))])
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    r, status = None, f"transport:{type(exc).__name__}"
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.ends.append(self.now())
                if r is not None and r.status_code == 200:
                    scores = r.json()["results"][0]["concept_scores"]
                    if np.allclose(scores, self.expected[k], atol=TOL):
                        self.verified += 1
                    else:
                        self.mismatched += 1
                self.stop_event.wait(0.2)


class Load:
    """``run_load`` in a thread (its own event loop) plus a prober, until ``stop()``."""

    def __init__(self, base: str, pngs: list[bytes], expected: list[list[float]], clients: int = 4):
        from .load import LoadStats, generate_call, moderate_call

        self.stats, self.base, self.clients = LoadStats(), base, clients
        self.calls = [(4.0, moderate_call("/v1/moderate", pngs, files=2)), (1.0, generate_call("/v1/generate"))]
        self.prober = Prober(base, pngs, expected, self.now)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _main(self) -> None:
        from .load import run_load

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await run_load(self.base, self.calls, self.clients, 3600, 10**6, stats=self.stats, stop=self._stop)

    def start(self) -> Load:
        self._thread.start()
        self.prober.start()
        return self

    def now(self) -> float:
        return time.monotonic() - self.stats.t0

    def stop(self) -> None:
        while self._loop is None:
            time.sleep(0.05)
        self._loop.call_soon_threadsafe(self._stop.set)
        self.prober.stop_event.set()
        self._thread.join(180)
        self.prober.join(180)

    def summary(self, window: tuple[float, float], checker: Any) -> dict[str, Any]:
        """The whole run's numbers, and the requests in flight at any moment of ``window`` (run seconds); every
        released generated image (up to 256) is scored again in-process with ``checker``."""
        from .load import disallowed, verify_samples

        s = self.stats
        verified = verify_samples(s, checker)
        during = [o for o in s.outcomes if o.start <= window[1] and o.end >= window[0]]
        ends = sorted([window[0]] + [o.end for o in s.outcomes if window[0] <= o.end <= window[1]] + [window[1]])
        return {
            **s.summary(),
            "window_s": [round(t, 1) for t in window],
            "in_window": {
                "requests": len(during),  # in flight at some moment of the window
                "statuses": dict(Counter(o.status for o in during)),
                "timeline": [(round(o.start, 1), round(o.end, 1), o.route, o.status) for o in during],
                "prober_ends": [round(t, 1) for t in self.prober.ends if window[0] <= t <= window[1]],
                "answered": len(ends) - 2,  # responses that arrived within the window
                # the longest stretch of the window without a response
                "longest_silence_s": round(max(b - a for a, b in zip(ends, ends[1:], strict=False)), 1),
            },
            "verified_images": verified,
            "unchecked_images_out": s.unchecked_images_out,  # again: verify_samples counts a mismatch here
            "disallowed": disallowed(s, {"200", "503"}),
            "problems": s.problems,
            "prober": {"statuses": self.prober.statuses, "verified": self.prober.verified},
            "prober_mismatched": self.prober.mismatched,
        }


def wait(predicate: Any, timeout_s: float) -> tuple[float | None, str]:
    """Poll ``predicate`` (the controller may still be recovering: an error is a no); returns the seconds it took,
    None past ``timeout_s``, and the last error seen."""
    start, seen = time.monotonic(), ""
    while time.monotonic() - start < timeout_s:
        try:
            if predicate():
                return round(time.monotonic() - start, 1), seen
        except Exception as exc:  # noqa: BLE001
            seen = f"{type(exc).__name__}: {str(exc)[:300]}"
        time.sleep(0.5)
    return None, seen


def on_workers(snap: dict[str, list[dict[str, Any]]], head: str) -> dict[str, list[str]]:
    """Each deployment's replica actors on worker nodes (those a head loss must leave alone)."""
    return {d: sorted(r["actor_id"] for r in rs if r["node_id"] != head) for d, rs in snap.items()}


def all_running(snap: dict[str, list[dict[str, Any]]]) -> bool:
    return all(rs and all(r["state"] == "RUNNING" for r in rs) for rs in snap.values())


def head_loss(cluster: LocalCluster, load: Load, before: dict[str, Any]) -> dict[str, Any]:
    head = next(nid for nid, pool in node_pools().items() if pool == "head")
    kept = on_workers(before, head)
    disconnect()  # the driver's raylet is the head's: leave before it dies
    # a warm service loses its head: each process has called every replica once (a first call resolves the actor's
    # address through the GCS, and waits for it while the GCS is down)
    warm_s, _ = wait(lambda: load.stats.requests >= 30, 120)
    killed_at = load.now()
    killed = cluster.kill_head()
    time.sleep(2)  # the head stays down this long and as long as `ray start` takes; the workers serve alone
    cluster.start_head()
    up_at = load.now()
    connect(cluster.address)

    def recovered() -> bool:
        snap = snapshot()
        return all_running(snap) and on_workers(snap, head) == kept

    recovered_s, error = wait(recovered, 120)
    time.sleep(3)  # load after the recovery
    return {
        "recovery_error": error,
        "window": (killed_at, up_at),
        "warm_up_s": warm_s,
        "killed": sorted(set(killed.values())),
        "killed_processes": len(killed),
        "head_down_s": round(up_at - killed_at, 1),
        "controller_recovered_after_head_up_s": recovered_s,
        "after": (after := last_snapshot()),
        "same_worker_replicas": on_workers(after, head) == kept and sum(map(len, kept.values())) > 0,
        "replicas_on_head_before": {d: sum(r["node_id"] == head for r in rs) for d, rs in before.items()},
    }


def drain(cluster: LocalCluster, load: Load, deadline_s: float) -> dict[str, Any]:
    import ray

    pools = node_pools()
    names = {n["NodeID"]: n["NodeName"] for n in ray.nodes()}
    checker = [r for r in snapshot()["SafetyChecker"] if r["state"] == "RUNNING"]
    node = checker[0]["node_id"]
    time.sleep(3)
    started = time.monotonic()
    cmd = [sys.executable, "-m", "k8s.prestop", "--address", cluster.address, "--node-id", node]
    cmd += ["--deadline-s", str(deadline_s), "--poll-s", "0.5"]
    hook = subprocess.run(cmd, cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=deadline_s + 60)
    hook_s = round(time.monotonic() - started, 1)
    window_start = load.now() - hook_s

    def moved() -> bool:
        running = [r for r in snapshot()["SafetyChecker"] if r["state"] == "RUNNING"]
        return bool(running) and all(r["node_id"] != node for r in running)

    moved_s, error = wait(moved, 120)
    after = snapshot()
    terminated = cluster.stop_worker(names[node])  # the kubelet's SIGTERM once the preStop hook returned
    time.sleep(3)  # load after the node is gone
    return {
        "window": (window_start, load.now()),
        "terminated_processes": terminated,
        "checker_moved_after_hook_s": moved_s,
        "move_error": error,
        "drained_node_pool": pools.get(node),
        "hook_rc": hook.returncode,
        "hook_output": hook.stdout.strip().splitlines(),
        "hook_s": hook_s,
        "deadline_s": deadline_s,
        "checker_before": [pools.get(r["node_id"]) for r in checker],
        "checker_after": [pools.get(r["node_id"]) for r in after["SafetyChecker"] if r["state"] == "RUNNING"],
        "replicas_left_on_drained_node": sum(r["node_id"] == node for rs in after.values() for r in rs),
    }


def run() -> dict[str, Any]:
    import tempfile

    from pipeline import SafetyChecker

    started = time.monotonic()
    pngs = [encode(img) for img in varied_images(8, seed=11)]
    checker = SafetyChecker.load("tiny", "cpu", "float32")
    expected = [list(v.concept_scores) for v in checker.check(pngs)]  # uploaded bytes: the same views as served
    with tempfile.TemporaryDirectory(prefix="hl", dir="/tmp") as tmp, LocalCluster(Path(tmp)) as cluster:
        os.environ.update(cluster.shared)  # this driver joins with the cluster's token, and waits out a GCS restart
        os.environ.pop("RAY_ADDRESS", None)
        try:
            return {**scenarios(cluster, pngs, expected, checker), "seconds": round(time.monotonic() - started, 1)}
        finally:
            disconnect()


def scenarios(cluster: LocalCluster, pngs: list[bytes], expected: list[list[float]], checker: Any) -> dict[str, Any]:
    from .apps import apply

    started = time.monotonic()
    gen_port = free_port()
    config = serve_config(free_port())
    deployments = config["applications"][0]["deployments"]
    graces = {d["name"]: d["graceful_shutdown_timeout_s"] for d in deployments if "graceful_shutdown_timeout_s" in d}
    cluster.start_head()
    cluster.add_worker("gen", "generation", gpus=2, proxy_port=gen_port)
    cluster.add_worker("chk1", "checking", gpus=1, proxy_port=free_port())
    cluster.add_worker("chk2", "checking", gpus=1, proxy_port=free_port())
    connect(cluster.address)
    apply(config, timeout_s=600)
    before = snapshot()
    pools = node_pools()
    out: dict[str, Any] = {
        "placement": {d: sorted(pools.get(r["node_id"], "?") for r in rs) for d, rs in before.items()},
        "graceful_shutdown_timeout_s": graces,
        "cluster_ready_s": round(time.monotonic() - started, 1),
        "before": before,
    }
    base = f"http://127.0.0.1:{gen_port}"  # the generation WORKER's proxy, never the head's

    load = Load(base, pngs, expected).start()
    out["head_loss"] = head_loss(cluster, load, before)
    load.stop()
    out["head_loss_load"] = load.summary(out["head_loss"].pop("window"), checker)
    if out["head_loss"]["controller_recovered_after_head_up_s"] is None:
        return out  # the head-loss result says what is wrong; a drain on a cluster that did not recover proves nothing

    load = Load(base, pngs, expected).start()
    out["drain"] = drain(cluster, load, deadline_s=max(graces.values()))
    load.stop()
    out["drain_load"] = load.summary(out["drain"].pop("window"), checker)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="write the result JSON here")
    args = parser.parse_args()
    args.out.write_text(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
