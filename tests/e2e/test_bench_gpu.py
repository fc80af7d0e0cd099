"""`python -m bench.gpu` (make bench-gpu) runs end to end on CPU at tiny sizes, as CI checks it without a GPU: the
core, batched generation, and the served path with the production config's settings on a local Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # deselected by `make test-fast`


def test_gpu_benchmark_script_runs_on_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # its own local Ray, as make bench-gpu
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "gpu.json").read_text())
    head, *rows = results["core"]
    assert head["gflop_per_image"] > 0 and [r["batch"] for r in rows] == [1, 4]
    assert all(r["images_s"] > 0 and r["tflops"] > 0 for r in rows)
    gen = results["generation"]
    assert gen["requests"] == 4 and gen["batched_images_s"] > 0 and gen["unbatched_images_s"] > 0
    assert gen["max_pixel_diff"] <= 1  # batched renders match each request alone
    served = results["served"]  # the production config's app on a local Ray, driven over HTTP
    assert served["config"] == "deployments/configs/production.yaml"
    assert served["front"] == ("haproxy" if shutil.which("haproxy") else "python-proxy (no haproxy on PATH)")
    assert served["checker_user_config"] == {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}
    rows = {r["route"]: r for r in served["rows"]}
    assert set(rows) == {"/v1/moderate", "/v1/generate"}
    assert all(r["images_per_s"] > 0 and r["errors"] == 0 and r["p50_ms"] > 0 for r in rows.values())
    assert served["per_image_ms"]["images"] > 0 and served["per_image_ms"]["model"] > 0
    md = (out / "gpu.md").read_text()
    assert "| float32 | 4 |" in md and "| /v1/moderate | 8 |" in md and "| /v1/generate | 8 |" in md


def test_gpu_benchmark_refuses_cuda_without_a_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr
