"""`diffguard serve` as `make serve` runs it (README): starts, serves, and shuts down cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT
from tests.integration.conftest import free_port


def test_serve_starts_answers_and_stops(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--num-cpus", "2"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    try:
        deadline = time.monotonic() + 300
        while "serving on" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(1)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=30).json()["ready"] is True
        r = httpx.post(f"{base}/v1/generate", json={"prompt": "a red bicycle", "seed": 1, "steps": 2}, timeout=120)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert "MEANINGLESS" in (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "shutting down" in (tmp_path / "serve.log").read_text()
