"""Ray token authentication end to end, as KubeRay's `authOptions` sets it up: a Ray cluster started with
RAY_AUTH_MODE=token and a token serves the app through `diffguard serve` (which joins it via RAY_ADDRESS), while a
client without the token is refused by Ray's control plane: the job API, `ray job submit`, `ray.init` and
`diffguard serve` itself. The API key reaches the Ingress as a file (DIFFGUARD_API_KEY_FILE), as on Kubernetes.

The cluster is `ray start --head --block` in its own process group on loopback ports chosen free, with its own temp
dir: teardown ends that group (and anything left under its temp dir), never another Ray on the machine."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.integration.conftest import free_port

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

TOKEN = secrets.token_hex(16)
API_KEY = secrets.token_hex(16)
TOKENLESS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Ray token (nor ~/.ray/auth_token: HOME is empty), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TOKENLESS}
    return {**env, "HOME": str(home), **extra}


def processes_under(directory: str) -> list[int]:
    """Processes whose command line names ``directory`` (this cluster's temp dir): only ours."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and directory in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ray-auth")
    temp_dir = tempfile.mkdtemp(prefix="dg-auth-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    (tmp / "api-key").write_text(f"  {API_KEY}\n")  # stripped by the Ingress
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent", "agent-grpc", "metrics", "runtime", "client")}
    env = {k: v for k, v in os.environ.items() if k not in (*TOKENLESS, "DIFFGUARD_API_KEY")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, DIFFGUARD_API_KEY_FILE=str(tmp / "api-key"))
    log = open(tmp / "ray.log", "w+")  # noqa: SIM115 - read on failure
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"]
        + ["--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]), "--num-cpus", "2", "--temp-dir", temp_dir]
        + ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"])]
        + [
            "--dashboard-agent-listen-port",
            str(ports["agent"]),
            "--dashboard-agent-grpc-port",
            str(ports["agent-grpc"]),
        ]
        + ["--metrics-export-port", str(ports["metrics"]), "--runtime-env-agent-port", str(ports["runtime"])]
        + ["--ray-client-server-port", str(ports["client"])],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: teardown ends exactly this cluster
    )
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, (tmp / "ray.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start: " + (tmp / "ray.log").read_text()[-3000:]
            try:
                if httpx.get(f"{dashboard}/api/jobs/", timeout=5).status_code == 401:  # up, and asking for the token
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield {"address": f"127.0.0.1:{ports['gcs']}", "dashboard": dashboard, "tmp": tmp}
    finally:
        with_signal = [(signal.SIGTERM, 10), (signal.SIGKILL, 10)]  # a throwaway cluster: no long wait on its drain
        for sig, wait in with_signal:
            if head.poll() is None:
                os.killpg(head.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    head.wait(timeout=wait)
        for pid in processes_under(temp_dir):  # workers that left the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run(argv: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("path", ["/api/jobs/", "/api/serve/applications/"])  # the job API, Serve's REST API
def test_the_dashboard_apis_want_the_token(cluster, path):
    url = f"{cluster['dashboard']}{path}"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.put(url, json={"applications": []}, timeout=30).status_code in (401, 405)
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 403
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).status_code == 200


def test_ray_job_submit_without_the_token_is_refused_and_runs_nothing(cluster, tmp_path):
    argv = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", cluster["dashboard"]]
    out = run([*argv, "--", "python", "-c", "print('pwned')"], client_env(tmp_path))
    assert out.returncode != 0 and "Token authentication is enabled" in out.stdout + out.stderr, out
    wrong = run([*argv, "--", "true"], client_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong"))
    assert wrong.returncode != 0 and "token is invalid or incorrect" in wrong.stdout + wrong.stderr, wrong.stderr
    jobs = httpx.get(f"{cluster['dashboard']}/api/jobs/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert jobs.json() == []  # nothing was submitted


def test_a_driver_without_the_token_cannot_join(cluster, tmp_path):
    code = f"import ray; ray.init(address={cluster['address']!r}); print('JOINED')"
    out = run([sys.executable, "-c", code], client_env(tmp_path))
    assert out.returncode != 0 and "JOINED" not in out.stdout, out
    assert "InvalidAuthToken" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]


def test_diffguard_serve_without_the_token_cannot_deploy(cluster, tmp_path):
    env = client_env(tmp_path, RAY_ADDRESS=cluster["address"])
    out = run([sys.executable, "-m", "pipeline", "serve", "--port", str(free_port())], env)
    assert out.returncode != 0 and "serving on" not in out.stdout, out.stdout[-3000:]
    assert "InvalidAuthToken" in out.stdout + out.stderr


def test_diffguard_serve_with_the_token_serves_the_app(cluster, tmp_path):
    port = free_port()
    env = client_env(tmp_path, RAY_ADDRESS=cluster["address"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while "serving on" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not start: " + log_path.read_text()[-3000:]
            time.sleep(1)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=30).json()["ready"] is True
        assert httpx.get(f"{base}/v1/info", timeout=30).status_code == 401  # the API key, read from its file
        info = httpx.get(f"{base}/v1/info", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert info.status_code == 200 and info.json()["checker"]["model"] == "tiny"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    assert code == 0, log_path.read_text()[-3000:]
