"""``diffguard scan`` over a bucket served by moto (a real S3 API over HTTP), against the core alone.

The CLI runs as a user runs it: a subprocess that starts its own local Ray. Two runs, a small bucket prefix and a
large one, separate the fixed cost (interpreter, Ray start, model loads, actor start) from the streaming rate:
``(N_large - N_small) / (T_large - T_small)``. The core alone is ``SafetyChecker.check`` on the same PNG bytes at
the scan's batch size, in this process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import models
from .core import bytes_rates

log = logging.getLogger("bench")

SCAN_DTYPE = "auto"
SCAN_BATCH = 32  # the CLI's default --batch-size


@dataclass(frozen=True)
class ScanPlan:
    images: int  # the large prefix
    small: int  # the small prefix (fixed-cost run); 0: only the large run
    one_thread_run: bool = False  # also scan the large prefix with --threads 1 (Ray's default for a 1-CPU actor)
    size: int = 512


def run_scan_bench(plan: ScanPlan, repo: str) -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    # moto takes any credentials; the scan subprocess and its Ray workers inherit these (boto3's standard chain)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    checker_dir = models.model_dir("vit-b-32")
    bodies = models.pngs(models.images(64, seed=4, size=plan.size))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        bucket = "bench"
        s3.create_bucket(Bucket=bucket)
        runs = []
        for prefix, n in (("small", plan.small), ("large", plan.images)):
            if n == 0:
                continue
            objects = {f"{prefix}/{i:05d}.png": bodies[i % len(bodies)] for i in range(n)}
            with ThreadPoolExecutor(8) as pool:  # within the client's connection pool
                list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))
            runs.append({"prefix": prefix, **_scan(bucket, prefix, endpoint, checker_dir, repo), "objects": n})
            log.info("scan %s", runs[-1])
        if plan.one_thread_run:  # before the scan gave its actors --threads: Ray's 1 thread for a 1-CPU actor
            extra = _scan(bucket, "large", endpoint, checker_dir, repo, ["--threads", "1"], "large-1-thread")
            threaded = {"prefix": "large, --threads 1", **extra, "objects": plan.images}
            log.info("scan %s", threaded)
    finally:
        server.stop()
    core = bytes_rates(checker_dir, SCAN_DTYPE, bodies, [SCAN_BATCH])[SCAN_BATCH]
    large = runs[-1]
    out: dict[str, Any] = {
        "model": "ViT-B/32",
        "dtype": SCAN_DTYPE,
        "image": f"{plan.size}x{plan.size} PNG",
        "runs": runs,
        "core_images_per_s": core,
        "end_to_end_images_per_s": large["scanned"] / large["seconds"],
    }
    out["x_core_end_to_end"] = out["end_to_end_images_per_s"] / core
    if plan.one_thread_run:
        out["one_thread_run"] = threaded
        out["one_thread_end_to_end_images_per_s"] = threaded["scanned"] / threaded["seconds"]
        out["x_core_one_thread_end_to_end"] = out["one_thread_end_to_end_images_per_s"] / core
    # The difference of two runs separates start-up from streaming, unless noise made the small run relatively slower.
    if len(runs) == 2 and runs[1]["seconds"] / runs[1]["scanned"] < runs[0]["seconds"] / runs[0]["scanned"]:
        streaming = (runs[1]["scanned"] - runs[0]["scanned"]) / (runs[1]["seconds"] - runs[0]["seconds"])
        out["streaming_images_per_s"] = streaming
        out["x_core_streaming"] = streaming / core
        out["fixed_seconds"] = runs[0]["seconds"] - runs[0]["scanned"] / streaming
        if plan.one_thread_run and threaded["seconds"] > runs[0]["seconds"]:  # same start-up cost as the small run
            rate = (threaded["scanned"] - runs[0]["scanned"]) / (threaded["seconds"] - runs[0]["seconds"])
            out["one_thread_streaming_images_per_s"] = rate
            out["x_core_one_thread_streaming"] = rate / core
    return out


def _scan(
    bucket: str, prefix: str, endpoint: str, checker_dir: Any, repo: str, flags: list[str] | None = None, out: str = ""
) -> dict[str, Any]:
    source, dest = f"s3://{bucket}/{prefix}/", f"s3://{bucket}/out-{out or prefix}/"
    cmd = [sys.executable, "-m", "pipeline", "scan", source, "--output", dest]
    cmd += ["--endpoint-url", endpoint, "--model", str(checker_dir), "--dtype", SCAN_DTYPE, "--json", *(flags or [])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user runs it
    env["HF_HUB_OFFLINE"] = "1"  # the default policy's text tower is not cached here: fall back without a probe
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"diffguard scan exited {proc.returncode}: {proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "scanned": summary["scanned"], "errors": summary["errors"]}
