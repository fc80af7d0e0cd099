"""One real local Ray for every integration test in the session (2 CPUs, like CI), shut down at the end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.integration.browser import CHROMIUM, CHROMIUM_ARGS
from tests.integration.scan_support import s3_endpoint_fixture, s3_fixture  # noqa: F401 - moto S3 fixtures: s3_endpoint, s3


def run_driver(module: str, out: Path, *args: str) -> dict[str, Any]:
    """Run a reliability driver (``python -m tests.reliability.NAME --out OUT ...``) in its own process, with its own
    Ray (one Ray per process, and this session's may be up); its JSON result."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", module, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Replicas import test fakes (tests/fakes.py) and the project from the checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # address="local": always a new cluster of our own, never one that `ray start` left running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        yield ray
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[dev])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
