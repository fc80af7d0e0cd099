"""``diffguard serve``: start a local Ray (or join RAY_ADDRESS), deploy the Serve app, block until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ..errors import UsageError

log = logging.getLogger("diffguard")

HEALTHY_TIMEOUT_S = 300  # after the applications are RUNNING: until /healthz answers 200 (every replica started)


def _weights_banner(base: str) -> str:
    """What is demo and what is real, as the service's own ``/v1/info`` says (with ``DIFFGUARD_API_KEY`` when set);
    the tiny banner when it cannot be asked."""
    import json
    import urllib.request

    from ..tiny import TINY_BANNER, demo_banner

    request = urllib.request.Request(f"{base}/v1/info")
    if key := os.environ.get("DIFFGUARD_API_KEY", "").strip():
        request.add_header("Authorization", f"Bearer {key}")
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the service itself, never a proxy
        with opener.open(request, timeout=30) as response:
            info = json.load(response)
        return demo_banner({"demo": list(info["demo"]), "real": list(info["real"])}) or TINY_BANNER
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TINY_BANNER}; GET /v1/info lists which parts are demo and which real"


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (Ray Serve) until Ctrl-C")
    p.add_argument("--config", type=Path, help="Serve config file (default: deployments/configs/local.yaml)")
    p.add_argument("--host", help="HTTP host (default: the config's)")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's)")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the local Ray's Prometheus metrics (every ray_diffguard_* and ray_serve_* series) on PORT "
        "(default: a free port, printed at start; on a cluster you join, the cluster's own metrics port)",
    )
    p.add_argument(
        "--audit-dest",
        metavar="DEST",
        help="write every decision to the audit log, a Delta table under DEST (a directory or s3://bucket/prefix); "
        "sets `audit_dest` of the config's ingress (read it with `diffguard audit DEST`)",
    )
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from deployments.run import SERVING_RAY_ENV, check_auth, deploy, load_config, stop_serve, url, wait_healthy

    schema = load_config(args.config, args.host, args.port, args.audit_dest)  # bad config -> exit 2 before Ray starts
    address = os.environ.get("RAY_ADDRESS")  # join a running cluster (KubeRay), else start a new local one
    if address and args.metrics_port is not None:
        raise UsageError(
            f"--metrics-port {args.metrics_port}: this command joins the Ray cluster at RAY_ADDRESS={address}, whose "
            "nodes export metrics on their own port (8080 on KubeRay); drop --metrics-port or unset RAY_ADDRESS"
        )
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise UsageError(f"--metrics-port {args.metrics_port}: a TCP port is 1-65535")
    if not address:  # the replicas get this process's environment: refuse an open service before starting Ray
        check_auth(schema, os.environ)  # (on a cluster we join, the Ingress replicas apply the same rule at start)
        for name, value in SERVING_RAY_ENV.items():  # a Ray of our own: its serving settings, unless already set
            os.environ.setdefault(name, value)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(
        address=address or "local",
        namespace="serve",
        num_cpus=None if address else args.num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        **({"_metrics_export_port": args.metrics_port} if args.metrics_port is not None else {}),
    )
    try:
        deploy(schema)
        base = url(schema)
        if not wait_healthy(f"{base}/healthz", HEALTHY_TIMEOUT_S, stop):  # the line is true when it is printed
            return 0  # Ctrl-C while starting
        tiny = any("tiny" in str(app.args) for app in schema.applications)
        print(f"diffguard is serving on {base}  (API docs: {base}/docs, health: {base}/healthz)", flush=True)
        if tiny:
            log.warning("WARNING: %s", _weights_banner(base))
        print(
            f"try: curl -s -X POST {base}/v1/generate -H 'Content-Type: application/json' "
            f'-d \'{{"prompt": "a red bicycle", "seed": 1, "steps": 4}}\'',
            flush=True,
        )
        if not address:  # Prometheus scrapes this (docs/OPERATIONS.md); on a cluster, each node's own port
            port = ray._private.worker.global_worker.node.metrics_export_port
            print(f"metrics (Prometheus): http://127.0.0.1:{port}/metrics", flush=True)
            # a scan joins it (its series then leave through the same port); Ray's token auth needs the mode said
            auth = "" if os.environ.get("RAY_AUTH_MODE") == "disabled" else "RAY_AUTH_MODE=token "
            gcs = ray.get_runtime_context().gcs_address
            print(f"ray: {auth}RAY_ADDRESS={gcs} (for `diffguard scan` or `ray status` in this cluster)", flush=True)
        print("press Ctrl-C to stop", flush=True)
        stop.wait()
        print("shutting down...", flush=True)
    finally:  # Serve first, gracefully, then the Ray this process started or joined
        if not stop_serve():
            serve.shutdown()
        ray.shutdown()
    return 0
