"""A Ray cluster of ``ray start`` processes on this machine, its GCS stored in a loopback Redis (GCS fault tolerance),
as KubeRay runs one with ``gcsFaultToleranceOptions``: a head that can be SIGKILLed and started again, labelled
worker nodes that outlive it. Every process it starts is found again by the cluster's own temp dir and the process
tree under it, so cleaning up never touches another Ray on this machine (no ``ray stop``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import ROOT
from tests.integration.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
NAMESPACE = "diffguard-head-loss"  # RAY_external_storage_namespace: KubeRay sets one per cluster
RECONNECT_S = "300"  # RAY_gcs_rpc_server_reconnect_timeout_s: how long nodes and drivers wait for a restarted GCS


class LocalCluster:
    """``with LocalCluster(tmp) as c: c.start_head(); c.add_worker(...)``: a head and workers on loopback."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.temp_dir = tmp / "ray"  # short: Ray's socket paths must stay under 107 characters
        self.redis_port, self.gcs_port = free_port(), free_port()
        self.password = secrets.token_hex(16)
        # what every node, driver and hook of this cluster needs in its environment: token authentication on, as
        # KubeRay sets it in every Ray container, and patience with a GCS that restarts
        self.shared = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.shared["RAY_gcs_rpc_server_reconnect_timeout_s"] = RECONNECT_S
        self.redis: subprocess.Popen | None = None
        self.head_pids: set[int] = set()
        self.workers: dict[str, dict] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(self.shared)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def start_redis(self) -> None:
        data = self.tmp / "redis"
        data.mkdir(parents=True, exist_ok=True)
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.redis = subprocess.Popen(
            [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--requirepass", self.password]
            + ["--save", "", "--appendonly", "no", "--dir", str(data), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.redis_port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not listen within 30s")

    def _node_ports(self) -> list[str]:
        names = ("node-manager", "object-manager", "metrics-export", "dashboard-agent-listen")
        names += ("dashboard-agent-grpc", "runtime-env-agent")
        return [arg for name in names for arg in (f"--{name}-port", str(free_port()))]

    def _ray_start(self, args: list[str], env: dict[str, str]) -> None:
        proc = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args[:2])} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start_head(self) -> None:
        """Start (or start again) the head: no CPUs or GPUs (replicas live on workers), Serve's controller here."""
        # a restarted head pod starts with an empty /tmp: without this record `ray start` sees the workers' raylets
        # naming this GCS address and refuses to start a head there (a check for two heads on one machine)
        (self.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        before = set(self.roots())
        env = self.env(RAY_REDIS_ADDRESS=f"127.0.0.1:{self.redis_port}", RAY_external_storage_namespace=NAMESPACE)
        args = ["--head", "--port", str(self.gcs_port), "--redis-password", self.password, "--node-ip-address"]
        args += ["127.0.0.1", "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "false"]
        args += ["--temp-dir", str(self.temp_dir), "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
        self._ray_start(args + self._node_ports(), env)
        workers = self.tree(self._worker_roots())
        self.head_pids = {pid for pid in self.roots() if pid not in before and pid not in workers}

    def add_worker(self, name: str, pool: str, gpus: int, proxy_port: int, cpus: int = 1) -> None:
        """A worker node labelled ``diffguard.io/pool=<pool>``; its Serve proxy listens on ``proxy_port``
        (``RAY_SERVE_WORKER_PROXY_HTTP_PORT``: every node here shares one IP, so proxies need their own ports)."""
        before = set(self.roots())
        env = self.env(RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(proxy_port))
        args = ["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus)]
        args += ["--num-gpus", str(gpus), "--labels", f"diffguard.io/pool={pool}", "--node-name", name]
        args += ["--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
        self._ray_start(args + self._node_ports(), env)
        roots = {pid for pid in self.roots() if pid not in before} - self.tree(self.head_pids)
        self.workers[name] = {"pool": pool, "proxy_port": proxy_port, "roots": roots}

    def _worker_roots(self) -> set[int]:
        return {pid for w in self.workers.values() for pid in w["roots"]}

    def roots(self) -> set[int]:
        """Live processes naming this cluster's temp dir (its daemons and agents; workers rename themselves)."""
        found = set()
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(self.temp_dir) in part for part in p.info["cmdline"] or []):
                    found.add(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    @staticmethod
    def tree(pids: set[int]) -> set[int]:
        """The live processes among ``pids`` and all their descendants."""
        found = set()
        for p in filter(None, map(_proc, pids)):
            try:
                found |= {p.pid} | {c.pid for c in p.children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
        return found

    def pids(self) -> set[int]:
        """Every live process of this cluster."""
        return self.tree(self.roots() | self.head_pids | self._worker_roots())

    def head_processes(self) -> dict[int, str]:
        """The head's processes now: those it started with, and everything its raylet started since (the Serve
        controller, the head's proxy, agents)."""
        out = {}
        for p in filter(None, map(_proc, self.tree(self.head_pids))):
            try:
                out[p.pid] = p.name()
            except psutil.NoSuchProcess:
                continue
        return out

    def kill_head(self) -> dict[int, str]:
        """SIGKILL every head process at once (a node lost, not shut down); returns what was killed."""
        victims = self.head_processes()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        psutil.wait_procs([p for p in map(_proc, victims) if p], timeout=10)
        return victims

    def stop_worker(self, name: str) -> int:
        """SIGTERM a worker node's processes (a pod's termination), SIGKILL what is left after 10 s; returns how many
        processes it had."""
        procs = [p for p in map(_proc, self.tree(self.workers[name]["roots"])) if p]
        _signal(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=10)
        _signal(alive, signal.SIGKILL)
        return len(procs)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of this cluster, then Redis."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            procs = [p for p in map(_proc, self.pids()) if p]
            _signal(procs, sig)
            psutil.wait_procs(procs, timeout=10)
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait(10)

    def __enter__(self) -> LocalCluster:
        self.start_redis()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            continue
