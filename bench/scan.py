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
    cmd += ["--policy", "stock"]  # the core's benchmark scores stock concepts too (no text tower on this machine)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user runs it
    env["HF_HUB_OFFLINE"] = "1"  # never probe the Hub from a benchmark
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"diffguard scan exited {proc.returncode}: {proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "scanned": summary["scanned"], "errors": summary["errors"]}


# --- growth: the driver's memory and wall time of a no-change rerun as the bucket grows (issue 20) ----------------
DRIVER = (
    "import json, sys, time\n"
    "from pipeline.cli import main\n"
    "t0 = time.perf_counter()\n"
    "rc = main(sys.argv[1:])\n"
    "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024\n"
    "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t0, 'driver_peak_rss_mib': peak}), file=sys.stderr)\n"
)


def scan_driver(args: list[str], repo: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``diffguard scan ARGS`` in a fresh interpreter: its exit code, wall time and the driver's peak RSS (MiB).

    The peak is the scan process's own high-water mark (``VmHWM``): Ray's workers and raylet are other processes.
    Not ``ru_maxrss``: Linux carries the forking process's RSS into it across exec, so a benchmark that has just
    built a 10^7-row DEST would see its own size reported as the driver's."""
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, "scan", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"diffguard scan exited {proc.returncode}: {proc.stderr[-3000:]}")
    measured = json.loads(proc.stderr.strip().splitlines()[-1])
    summary = json.loads(proc.stdout.strip().splitlines()[-1]) if "--json" in args else {}
    return {**measured, "process_seconds": wall, "summary": summary}


def scanned_state(dest: str, rows: Any, fingerprint: str) -> None:
    """DEST as a completed scan leaves it: ``rows`` (key, etag, size, last_modified) recorded as scored and unflagged
    by the checker with ``fingerprint`` (what a first run records; written directly, 10^5+ objects unscored): one
    file per shard, committed as run 1."""
    import pyarrow as pa

    from pipeline.scan.commit import Inputs, commit_run
    from pipeline.scan.shards import shard_count, split, write_shard
    from pipeline.scan.state import conform, load_meta
    from pipeline.spec import CheckerSpec
    from pipeline.storage import parse_location

    spec = CheckerSpec()
    n = rows.num_rows
    table = rows.append_column("model_fingerprint", pa.array([fingerprint] * n, pa.string()))
    table = table.append_column("max_pixels", pa.array([spec.max_pixels] * n, pa.int64()))
    table = table.append_column("max_object_bytes", pa.array([spec.max_object_bytes] * n, pa.int64()))
    for name in ("flagged", "nsfw", "unscorable", "truncated", "tagged"):
        table = table.append_column(name, pa.array([False] * n, pa.bool_()))
    location, shards = parse_location(dest), shard_count(n)
    pieces = split(conform(table.replace_schema_metadata(None)), shards)
    results = {}
    for s, piece in enumerate([pieces] if shards == 1 else pieces):
        add = write_shard(location, s, shards, 1, piece.sort_by("key"))
        results[s] = {"add": add, "replaced": True, "rows": add["rows"]}
    source = rows.schema.metadata[b"source"].decode()
    commit_run(location, 1, source, load_meta(location), Inputs(shards, True, [], []), results, {})


def local_growth(n: int, root: str, repo: str) -> dict[str, Any]:
    """A no-change rerun over ``n`` tiny files in a local directory (DEST recorded as scanned by the tiny checker)."""
    from pathlib import Path

    import pyarrow as pa

    from pipeline.spec import CheckerSpec
    from pipeline.storage import LocalStore

    src, dest = Path(root, f"src-{n}"), Path(root, f"dest-{n}")
    if not src.exists():
        for i in range(n):
            folder = src / f"{i // 1000:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:08d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + i.to_bytes(8, "big"))
    if not dest.exists():
        listing = list(LocalStore(str(src)).list())
        rows = pa.table(
            {
                "bucket": [str(src)] * len(listing),
                "key": [o.key for o in listing],
                "etag": [o.etag for o in listing],
                "size": pa.array([o.size for o in listing], pa.int64()),
                "last_modified": pa.array([o.last_modified for o in listing], pa.timestamp("us", tz="UTC")),
            }
        ).replace_schema_metadata({"source": str(src)})
        scanned_state(str(dest), rows, CheckerSpec().load(device="cpu", dtype="float32").fingerprint)
    run = scan_driver([str(src), "--output", str(dest), "--json"], repo)
    assert run["summary"]["skipped_unchanged"] == n and run["summary"]["scanned"] == 0, run
    return {"objects": n, "input": "local directory", **{k: run[k] for k in ("seconds", "driver_peak_rss_mib")}}


def inventory_growth(n: int, root: str, repo: str, endpoint: str, files: int = 8) -> dict[str, Any]:
    """A no-change rerun of ``s3://growth/`` listed by a synthetic S3 Inventory report (Parquet, ``files`` data files)
    of ``n`` objects, DEST recorded as scanned: no object is read, so only the listing, the plan and the commit count.
    """
    import hashlib
    from datetime import UTC, datetime
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.spec import CheckerSpec

    base, dest = Path(root, f"inventory-{n}"), Path(root, f"inventory-dest-{n}")
    manifest = base / "inventory/growth/daily/2026-12-01T00-00Z/manifest.json"
    files = max(files, -(-n // 1_250_000))  # S3 writes files of a few million rows at most
    if not manifest.exists():
        modified = pa.scalar(datetime(2026, 11, 30, tzinfo=UTC), pa.timestamp("ms", tz="UTC"))
        entries, step = [], -(-n // files)
        for f in range(files):
            ids = range(f * step, min(n, (f + 1) * step))
            table = pa.table(
                {
                    "bucket": pa.array(["growth"] * len(ids)),
                    "key": pa.array([f"img/{i // 1000:05d}/{i:09d}.png" for i in ids]),
                    "size": pa.array([1000 + i % 977 for i in ids], pa.int64()),
                    "last_modified_date": pa.array([modified] * len(ids)),
                    "e_tag": pa.array([hashlib.md5(str(i).encode()).hexdigest() for i in ids]),
                }
            )
            rel = f"inventory/growth/daily/data/{f:04d}.parquet"
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, base / rel)
            data = (base / rel).read_bytes()
            entries.append({"key": rel, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
        manifest.parent.mkdir(parents=True, exist_ok=True)
        body = {"sourceBucket": "growth", "destinationBucket": "arn:aws:s3:::inv", "fileFormat": "Parquet"}
        manifest.write_text(json.dumps({**body, "fileSchema": "message s3.inventory {}", "files": entries}))
    if not dest.exists():
        tables = [pq.read_table(base / e["key"]) for e in json.loads(manifest.read_text())["files"]]
        raw = pa.concat_tables(tables)
        rows = pa.table(
            {
                "bucket": raw["bucket"],
                "key": raw["key"],
                "etag": raw["e_tag"],
                "size": raw["size"],
                "last_modified": raw["last_modified_date"].cast(pa.timestamp("us", tz="UTC")),
            }
        ).replace_schema_metadata({"source": "s3://growth/"})
        scanned_state(str(dest), rows, CheckerSpec().load(device="cpu", dtype="float32").fingerprint)
    args = ["s3://growth/", "--output", str(dest), "--inventory", str(manifest), "--endpoint-url", endpoint, "--json"]
    run = scan_driver(args, repo)
    assert run["summary"]["skipped_unchanged"] == n and run["summary"]["scanned"] == 0, run
    return {"objects": n, "input": "inventory", **{k: run[k] for k in ("seconds", "driver_peak_rss_mib")}}


def first_run(n: int, root: str, repo: str) -> dict[str, Any]:
    """A first run over ``n`` real tiny PNGs (8x8) in a local directory into a fresh DEST: every image is read, scored
    and committed, so the driver's peak RSS shows what passes through it besides the listing and the plan."""
    import io
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    src, dest = Path(root, f"first-src-{n}"), Path(root, f"first-dest-{n}")
    if not src.exists():
        rng = np.random.default_rng(0)
        for i in range(n):
            folder = src / f"{i // 1000:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            (folder / f"{i:08d}.png").write_bytes(buf.getvalue())
    shutil.rmtree(dest, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": repo}  # the driver and its Ray workers run ``repo``'s code
    run = scan_driver([str(src), "--output", str(dest), "--json"], repo, env)
    assert run["summary"]["scanned"] == n and run["summary"]["errors"] == 0, run
    return {
        "objects": n,
        "input": "local directory, first run",
        **{k: run[k] for k in ("seconds", "driver_peak_rss_mib")},
    }


def first_run_s3(n: int, endpoint: str, root: str, repo: str) -> dict[str, Any]:
    """A first run over ``n`` real tiny PNGs (8x8) in ``s3://growth/first-N/`` (moto, put through its backend in
    this process: HTTP PUTs would take longer than the scan), DEST a fresh local directory."""
    import io
    import shutil
    from pathlib import Path

    import numpy as np
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from PIL import Image

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        backend.put_object("growth", f"first-{n}/{i // 1000:04d}/{i:08d}.png", buf.getvalue())
    dest = Path(root, f"first-s3-dest-{n}")
    shutil.rmtree(dest, ignore_errors=True)
    args = [f"s3://growth/first-{n}/", "--output", str(dest), "--endpoint-url", endpoint, "--json"]
    run = scan_driver(args, repo, {**os.environ, "PYTHONPATH": repo})
    assert run["summary"]["scanned"] == n and run["summary"]["errors"] == 0, run
    return {"objects": n, "input": "moto bucket, first run", **{k: run[k] for k in ("seconds", "driver_peak_rss_mib")}}


@dataclass(frozen=True)
class GrowthPlan:
    inventory: tuple[int, ...]  # no-change reruns listed by a synthetic S3 Inventory report of these sizes
    images: tuple[int, ...]  # first runs over this many real tiny images, local and in moto


def run_growth(plan: GrowthPlan, repo: str) -> dict[str, Any]:
    """The driver's wall time and peak RSS as the bucket grows (no-change reruns from an inventory), and the
    end-to-end images/s of first runs over real tiny images, local and in moto."""
    import tempfile

    work = os.environ.get("GROWTH_DIR") or tempfile.mkdtemp(prefix="growth-")

    def measure(endpoint: str) -> dict[str, Any]:
        reruns = [inventory_growth(n, work, repo, endpoint) for n in plan.inventory]
        firsts = [first_run(n, work, repo) for n in plan.images] + [
            first_run_s3(n, endpoint, work, repo) for n in plan.images
        ]
        for r in firsts:
            r["images_per_s"] = r["objects"] / r["seconds"]
        return {"reruns": reruns, "first_runs": firsts}

    return with_moto(measure)


def with_moto(fn: Any) -> Any:
    """Run ``fn(endpoint)`` with moto's S3 server up and a bucket ``growth`` (the inventory's SOURCE) created."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="growth")
        return fn(endpoint)
    finally:
        server.stop()


# --- listing: one sequential paginator against the prefix fan-out (issue 20) -------------------------------------
def listing_bench(n: int, endpoint: str, prefixes: int = 256) -> dict[str, Any]:
    """List ``s3://listing-N/img/`` (``n`` objects under ``prefixes`` hash-like prefixes, ``img/<xx>/<id>.png``) with
    the sequential paginator and with the prefix fan-out (forced: ``fanout_min=0``): the fan-out alone (Ray already
    up) and cold (its own Ray start included, as a scan without a cluster pays it).

    The objects are put through moto's backend directly, in this process (the server answers from the same memory):
    10^5 HTTP PUTs would take longer than the listings measured. The listings themselves go over HTTP."""
    import ray
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from pipeline.scan.job import fanout_listing
    from pipeline.scan.plan import list_source
    from pipeline.storage import Location, S3Store

    bucket = f"listing-{n}"
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(bucket, "us-east-1")
    for i in range(n):
        backend.put_object(bucket, f"img/{i % prefixes:02x}/{i:08d}.png", b"\x89PNG" + i.to_bytes(4, "big"))
    source = Location(S3Store(bucket, endpoint), "img/")

    t0 = time.perf_counter()
    sequential, _ = list_source(source, [])
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold, tasks = fanout_listing(source, [], fanout_min=0)  # starts and stops its own local Ray
    t_cold = time.perf_counter() - t0
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        t0 = time.perf_counter()
        warm, _ = fanout_listing(source, [], fanout_min=0)
        t_warm = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert sequential.num_rows == cold.num_rows == warm.num_rows == n and tasks > 1, (sequential.num_rows, tasks)
    assert warm.equals(sequential) and cold.equals(sequential)
    return {
        "objects": n,
        "prefixes": prefixes,
        "list_calls_sequential": -(-n // 1000),
        "sequential_s": round(t_seq, 2),
        "fanout_s": round(t_warm, 2),
        "fanout_cold_s": round(t_cold, 2),
        "listing_tasks": tasks,
        "x_fanout": round(t_seq / t_warm, 2),
        "x_fanout_cold": round(t_seq / t_cold, 2),
        "cpus": os.cpu_count(),
    }


def local_walk(n: int, root: str) -> dict[str, Any]:
    """The local walk of ``n`` tiny files (``src-N/<n // 1000>/<id>.png``, as ``growth`` makes them) against Ray's
    start alone: what a fan-out by subdirectory would have to beat before listing anything."""
    from pathlib import Path

    import ray

    from pipeline.scan.plan import list_source
    from pipeline.storage import parse_location

    src = Path(root, f"src-{n}")
    if not src.exists():
        for i in range(n):
            folder = src / f"{i // 1000:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:08d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + i.to_bytes(8, "big"))
    t0 = time.perf_counter()
    listed, _ = list_source(parse_location(str(src)), [])
    walk = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    start = time.perf_counter() - t0
    ray.shutdown()
    assert listed.num_rows == n
    return {"objects": n, "input": "local directory", "walk_s": round(walk, 2), "ray_start_s": round(start, 2)}


if __name__ == "__main__":  # one JSON line per size
    import tempfile

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = os.environ.get("GROWTH_DIR") or tempfile.mkdtemp(prefix="growth-")
    if sys.argv[1] == "first-run":  # python -m bench.scan first-run N ... [--repo DIR]: first runs over N tiny PNGs
        sizes, repo = sys.argv[2:], repo_root
        if "--repo" in sizes:  # another checkout's code (e.g. the previous version, for a before/after figure)
            at = sizes.index("--repo")
            sizes, repo = sizes[:at] + sizes[at + 2 :], os.path.abspath(sizes[at + 1])
        for size in sizes:
            print(json.dumps({**first_run(int(size), work, repo), "repo": repo}), flush=True)
    elif sys.argv[1] == "growth":  # python -m bench.scan growth N ...: local directories of N tiny files
        for size in sys.argv[2:]:
            print(json.dumps(local_growth(int(size), work, repo_root)), flush=True)
    elif sys.argv[1] == "listing":  # python -m bench.scan listing N ...: sequential LIST against the fan-out
        for size in sys.argv[2:]:
            print(json.dumps(with_moto(lambda endpoint, n=int(size): listing_bench(n, endpoint))), flush=True)
            print(json.dumps(local_walk(int(size), work)), flush=True)
    else:  # python -m bench.scan inventory-growth N ...: synthetic S3 Inventory reports of N objects
        for size in sys.argv[2:]:
            out = with_moto(lambda endpoint, n=int(size): inventory_growth(n, work, repo_root, endpoint))
            print(json.dumps(out), flush=True)
