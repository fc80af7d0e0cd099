"""``/v1/moderate`` through each of Ray Serve's HTTP fronts, in one run: the default Python proxy, the HAProxy ingress
(``RAY_SERVE_ENABLE_HA_PROXY=1``), direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``) and Serve's
throughput-optimised preset (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``), against the checker's own handle and the core in
this process; and where decoding belongs (in the checker replica's thread pool, or before the batch queue).

Serve reads these variables when its processes start, so each variant runs in a fresh Ray cluster in its own child
process (``python -m bench.proxy --child VARIANT``), one after the other, on the same PNGs and the same moderation-only
app as the ``service`` section's ``batched`` variant. A variant that cannot run here says why in its row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

VARIANTS: dict[str, dict[str, str]] = {
    "python-proxy": {},  # Serve's default: one Python proxy actor per node in front of the Ingress replicas
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},  # HAProxy in front, Ingress replicas serve HTTP themselves
    "direct-ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},  # Ingress replicas serve HTTP, no proxy
    "throughput-optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},  # direct ingress + gRPC + code on main loop
}
SERVE_ENV = tuple(sorted({k for env in VARIANTS.values() for k in env}))


@dataclass(frozen=True)
class ProxyPlan:
    clients: int = 32  # concurrent closed-loop clients
    warmup_s: float = 4
    measure_s: float = 10
    rounds: int = 1  # each round runs every variant once, in order (interleaves them when > 1)
    images: int = 64
    size: int = 512
    variants: tuple[str, ...] = tuple(VARIANTS)


def _split_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The checker replica's per-image decode/preprocess/model milliseconds over one load window (from /v1/info's
    running means before and after)."""
    n0, n1 = before.get("images") or 0, after.get("images") or 0
    n = n1 - n0
    out: dict[str, Any] = {"images": n}
    for k in ("decode", "preprocess", "model"):
        total = (after.get(k) or 0) * n1 - (before.get(k) or 0) * n0
        out[k] = round(total / n, 3) if n > 0 else None
    return out


def _child(variant: str, plan: ProxyPlan, out: Path) -> None:
    """One variant in a fresh local Ray: deploy, drive over HTTP (and, for the first variant, through the handle
    with bytes and with arrays decoded before the queue), write the rows as JSON."""
    import httpx
    import ray
    from ray import serve

    from deployments.run import config_schema, deploy
    from pipeline.images import load_images

    from . import models
    from .load import free_port, run_handle_load, run_load, start_serving_ray
    from .service import ServicePlan, serve_config

    port = free_port()
    checker_dir = models.model_dir("vit-b-32")
    raw = serve_config(port, checker_dir, ServicePlan(clients=(plan.clients,), warmup_s=0, measure_s=0))
    raw["applications"] = [a for a in raw["applications"] if a["name"] == "batched"]
    bodies = models.pngs(models.images(plan.images, seed=3, size=plan.size))
    rows: list[dict[str, Any]] = []
    start_serving_ray()  # with the serving settings `diffguard serve` gives its Ray
    try:
        deploy(config_schema(raw), timeout_s=600)
        url = f"http://127.0.0.1:{port}/batched/v1/moderate"
        _first_request(url, bodies[0])
        haproxy = _haproxy_running()
        window = (plan.warmup_s, plan.measure_s)

        def split() -> dict[str, Any]:  # over HTTP: a driver-side handle call needs an event loop in some modes
            return httpx.get(url.replace("/v1/moderate", "/v1/info"), timeout=60).json()["checker"]["per_image_ms"]

        def measured(name: str, run: Any) -> None:
            before = split()
            row = {"variant": name, **run()}
            row["checker_ms"] = _split_delta(before, split())
            rows.append(row)
            log.info("proxy %s", row)

        measured(variant, lambda: run_load(url, bodies, plan.clients, *window))
        if variant == plan.variants[0]:  # the same cluster, no HTTP: the checker fed bytes, or decoded arrays
            handle = serve.get_deployment_handle("SafetyChecker", app_name="batched")
            arrays = [a for a in load_images(bodies) if not isinstance(a, Exception)]
            measured("handle (decode in checker)", lambda: run_handle_load(handle, bodies, plan.clients, *window))
            measured("handle (decoded before queue)", lambda: run_handle_load(handle, arrays, plan.clients, *window))
        for r in rows:
            r["haproxy_process"] = haproxy
    finally:
        serve.shutdown()
        ray.shutdown()
    out.write_text(json.dumps(rows))


def _first_request(url: str, body: bytes) -> None:
    """Until the front answers 200 (lazy initialisation, routes reaching the proxy), or why it never did."""
    import httpx

    deadline, last = time.monotonic() + 120, "nothing"
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, content=body, headers={"content-type": "image/png"}, timeout=60)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer 200 within 120 s; last: {last}")


def _haproxy_running() -> bool:
    """Whether an ``haproxy`` process runs now (this run's only: the bench starts the only cluster here)."""
    import psutil

    return any(p.info["name"] == "haproxy" for p in psutil.process_iter(["name"]))


def run_proxy_bench(plan: ProxyPlan) -> dict[str, Any]:
    """Every variant in its own fresh cluster, ``plan.rounds`` times in turn; then the core in this process."""
    from . import models
    from .core import bytes_rates

    rows: list[dict[str, Any]] = []
    for round_ in range(plan.rounds):
        for variant in plan.variants:
            rows.extend(_run_variant(variant, plan, round_))
    bodies = models.pngs(models.images(plan.images, seed=3, size=plan.size))
    batches = sorted({max(1, round(r["mean_batch"] or 1)) for r in rows if r.get("images_per_s")})
    core = bytes_rates(models.model_dir("vit-b-32"), "auto", bodies, batches or [1])
    for r in rows:
        if r.get("images_per_s"):
            b = max(1, round(r["mean_batch"] or 1))
            r["core_images_per_s"], r["x_core"] = core[b], r["images_per_s"] / core[b]
    base = [r["images_per_s"] for r in rows if r["variant"] == plan.variants[0] and r.get("images_per_s")]
    for r in rows:
        if base and r.get("images_per_s"):
            r["x_python_proxy"] = r["images_per_s"] / (sum(base) / len(base))
    return {
        "model": "ViT-B/32",
        "image": f"{plan.size}x{plan.size} PNG, one per request (raw body)",
        "clients": plan.clients,
        "haproxy": shutil.which("haproxy"),
        "rows": rows,
        "core_images_per_s": core,
    }


def _run_variant(variant: str, plan: ProxyPlan, round_: int) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in SERVE_ENV}
    env.update(VARIANTS[variant])
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # shutdown only: no 30 s drain before the next variant
    if variant == "haproxy" and not shutil.which("haproxy"):
        return [{"variant": variant, "round": round_, "skipped": "no `haproxy` on PATH (apt-get install haproxy)"}]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "bench.proxy", "--child", variant, "--plan", json.dumps(asdict(plan))]
        cmd += ["--out", str(out)]
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return [{"variant": variant, "round": round_, "skipped": "did not finish within 900 s"}]
        if done.returncode != 0 or not out.exists():
            why = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            log.warning("proxy %s failed:\n%s", variant, done.stderr[-3000:])
            return [{"variant": variant, "round": round_, "skipped": f"failed: {why}"}]
        rows = json.loads(out.read_text())
    for r in rows:
        r.update(round=round_, variant_seconds=round(time.perf_counter() - started, 1))
    return rows


def section(proxy: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """The A/B table: one row per variant and round, ratios to the Python proxy and to the core in one process."""
    from .report import table

    rows = []
    for r in proxy["rows"]:
        split = r.get("checker_ms") or {}
        rows.append(
            [
                r["variant"],
                r.get("round", 0),
                r.get("images_per_s"),
                r.get("p50_ms"),
                r.get("p99_ms"),
                r.get("mean_batch"),
                r.get("x_python_proxy"),
                r.get("x_core"),
                "/".join("-" if split.get(k) is None else f"{split[k]:.1f}" for k in ("decode", "preprocess", "model")),
                r.get("errors") if "skipped" not in r else r["skipped"],
            ]
        )
    headers = ["front", "round", "images/s", "p50 ms", "p99 ms", "mean batch", "x python proxy", "x core"]
    headers += ["checker ms/img decode/pre/model", "errors"]
    title = f"HTTP fronts for /v1/moderate ({proxy['model']}, {proxy['image']}, {proxy['clients']} clients)"
    return title, table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("--child", choices=list(VARIANTS), required=True)
    parser.add_argument("--plan", required=True, help="ProxyPlan as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    fields = json.loads(args.plan)
    fields["variants"] = tuple(fields["variants"])
    _child(args.child, ProxyPlan(**fields), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
