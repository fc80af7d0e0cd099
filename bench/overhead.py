"""``python -m bench --only overhead``: the CPU each image costs outside the model, per process, per served path.

The app is the shipped local config with the model replaced by a null model of the same output shape (the checker's
vision tower returns zero embeddings; the generator returns ready 512×512 photos instead of denoising), so what remains
is the overhead: the HTTP front, the ingress, Ray's hops, decoding, preprocessing, verdicts and PNG encoding. Each
path is driven at saturation by a closed loop of clients in this process, while the CPU time of every process of the
cluster is sampled from ``/proc`` (psutil) before and after the window and divided by the images served:

- ``moderate PNG`` / ``moderate JPEG``: ``POST /v1/moderate`` with a raw 512×512 photo (``image/png``, ``image/jpeg``);
- ``moderate multipart``: the same PNGs as one ``files`` part each;
- ``generate``: ``POST /v1/generate`` for one 512×512 image: render (null), score, PNG-encode, base64;
- ``scan stages``: the scan's per-object work in this process (read the file, decode into views, preprocess, null
  model, verdict), CPU time per stage (Ray Data's own scheduling is not in it).

The load generator is this process: its CPU is reported and excluded. Every front runs in a fresh Ray cluster in a
child process (``python -m bench.overhead --child FRONT``), as in :mod:`bench.proxy`, with the serving settings
(``deployments.run.SERVING_RAY_ENV``); ``FRONT (before)`` runs it as the service ran before these were measured and
cut: Ray's default 100 KiB inline limit, every image decoded by Pillow (``DIFFGUARD_FAST_DECODE=0``), released PNGs
at zlib level 6. Cores per 1,000 images/s is the total CPU-ms per image (1,000 images/s × N ms = N cores).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("bench")

BEFORE = " (before)"
PATHS = ("moderate PNG", "moderate JPEG", "moderate multipart", "generate")
ROLES = ("front", "ingress", "checker", "generator", "serve other", "ray system")


@dataclass(frozen=True)
class OverheadPlan:
    # bench.proxy.VARIANTS names, each in its own cluster with the serving settings (deployments.run.SERVING_RAY_ENV);
    # "NAME (before)": as the service ran before issue 30 (Ray's defaults, Pillow decoding, PNG level 6)
    fronts: tuple[str, ...] = ("python-proxy (before)", "python-proxy", "haproxy")
    clients: int = 32
    warmup_s: float = 3.0
    measure_s: float = 8.0
    images: int = 16  # distinct 512×512 photos the clients cycle through
    size: int = 512
    scan_objects: int = 32  # objects through the scan's stages in this process


# --- the null model ---------------------------------------------------------------------------------------------------
def photos(n: int, size: int = 512) -> list[np.ndarray]:
    """``n`` distinct real photographs (scikit-image's samples, in its wheel), ``size``×``size`` RGB: crops, flips."""
    from skimage import data

    sources = [np.asarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for k in range(n):
        src = sources[k % len(sources)]
        h, w = src.shape[:2]
        side = min(h, w) - 8 * (k // len(sources))
        crop = src[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        im = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if k % 2 else im))
    return out


def encoded(arrays: list[np.ndarray], fmt: str) -> list[bytes]:
    out = []
    for arr in arrays:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def null_checker(args: Any) -> Any:
    """The configured checker with its vision tower replaced by zeros of the same shape (B, D): decoding, views,
    preprocessing and verdicts run as served; the model costs nothing."""
    import torch

    checker = args.spec().load()
    dim = checker.concepts.embeds.shape[1]
    checker.embed_pixels = lambda pixels: torch.zeros((len(pixels), dim))
    return checker


class NullGenerator:
    """Ready photos instead of denoising: what the generate path costs around the model."""

    def __init__(self, args: Any, limits: Any):
        self.photos = photos(4)

    def render(self, request: Any) -> Any:
        from pipeline.generator import Rendering

        seed = request.seed or 0
        images = [self.photos[(seed + i) % len(self.photos)].copy() for i in range(request.num_images)]
        return Rendering(images, seed, 512, 512)

    def info(self) -> dict[str, Any]:
        return {"model": "null", "fingerprint": "null", "demo_weights": True, "text_encoder": None}


# --- CPU per process --------------------------------------------------------------------------------------------------
def role(cmdline: list[str], name: str) -> str | None:
    """Which part of the service a process is (None: not the cluster's)."""
    head = cmdline[0] if cmdline else ""
    if name == "haproxy" or head.startswith("ray::ProxyActor"):
        return "front"
    if head.startswith("ray::ServeReplica:"):
        deployment = head.split(":")[-1].split(".")[0].split(" ")[0]
        names = {"Ingress": "ingress", "SafetyChecker": "checker", "Generator": "generator"}
        return names.get(deployment, "serve other")
    if head.startswith("ray::") or name in ("raylet", "gcs_server") or any("/ray/" in part for part in cmdline[:3]):
        return "ray system"
    return None


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for every process of the cluster, and this one as ``load generator``."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            kind = "load generator" if p.pid == os.getpid() else role(p.info["cmdline"] or [], p.info["name"] or "")
            if kind is not None:
                t = p.cpu_times()
                out[p.pid] = (kind, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two samples (processes that started in between count from zero)."""
    spent: dict[str, float] = {}
    for pid, (kind, total) in after.items():
        spent[kind] = spent.get(kind, 0.0) + total - before.get(pid, (kind, 0.0))[1]
    return spent


# --- load -------------------------------------------------------------------------------------------------------------
def _sender(client: Any, base: str, path: str) -> Any:
    async def send(body: bytes) -> tuple[bool, int | None]:
        try:
            if path == "moderate multipart":
                r = await client.post(f"{base}/v1/moderate", files={"files": ("x.png", body, "image/png")})
            elif path == "generate":
                r = await client.post(f"{base}/v1/generate", content=body, headers={"content-type": "application/json"})
            else:
                kind = "image/jpeg" if path == "moderate JPEG" else "image/png"
                r = await client.post(f"{base}/v1/moderate", content=body, headers={"content-type": kind})
            if r.status_code != 200:
                return False, None
            if path == "generate":  # a released image: scored, PNG-encoded (the null generator's photos are safe)
                image = r.json()["images"][0]
                ok = bool(image["image_png_base64"] and base64.b64decode(image["image_png_base64"]))
                return ok, image["moderation"]["batch_size"]
            return True, r.json()["results"][0].get("batch_size")
        except Exception:  # noqa: BLE001 - any failure is an error row, never the run's
            return False, None

    return send


def drive(base: str, path: str, bodies: list[bytes], clients: int, warmup_s: float, measure_s: float) -> dict:
    """One path at saturation: images/s and CPU-ms per image per role over the measurement window."""
    import httpx

    from .load import _drive, _summary

    samples: dict[str, Any] = {}

    async def run() -> Any:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            loop = asyncio.get_running_loop()
            # At the window's edges: requests in flight at its start and at its end balance out.
            loop.call_later(warmup_s, lambda: samples.setdefault("before", cpu_by_process()))
            loop.call_later(warmup_s + measure_s, lambda: samples.setdefault("after", cpu_by_process()))
            return await _drive(_sender(client, base, path), bodies, clients, warmup_s, measure_s)

    raw_samples, window = asyncio.run(run())
    summary = _summary(clients, raw_samples, window)
    served = summary["images_per_s"] * (window[1] - window[0])
    spent = cpu_delta(samples["before"], samples.get("after") or cpu_by_process())
    ms = {k: round(1000 * v / served, 3) if served else None for k, v in spent.items()}
    service = sum(v for k, v in ms.items() if k != "load generator" and v is not None)
    return {"path": path, **summary, "cpu_ms_per_image": ms, "service_cpu_ms": round(service, 3)}


# --- the scan's stages, in this process -------------------------------------------------------------------------------
def scan_stages(objects: int, size: int) -> list[dict[str, Any]]:
    """CPU-ms per object of the scan's own stages (read, decode into views, preprocess, null model, verdict), with
    every image through Pillow (before) and with the fast decoders (:mod:`pipeline.fastdecode`)."""
    from deployments.settings import CheckerArgs
    from pipeline.fastdecode import SWITCH
    from pipeline.images import read_path
    from pipeline.views import load_views

    checker = null_checker(CheckerArgs(model="tiny", device="cpu", dtype="float32"))
    checker.set_policy("stock")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, body in enumerate(encoded(photos(objects, size), "PNG")):
            paths.append(Path(tmp) / f"{i:04d}.png")
            paths[-1].write_bytes(body)
        for name, switch in (("scan stages (before: Pillow)", "0"), ("scan stages", "1")):
            os.environ[SWITCH] = switch
            spent = dict.fromkeys(("read", "decode", "preprocess + model + verdict"), 0.0)
            for chunk in range(0, len(paths), 16):
                t = time.process_time()
                data = [read_path(p, checker.limits) for p in paths[chunk : chunk + 16]]
                spent["read"] += time.process_time() - t
                t = time.process_time()
                viewed = load_views(data, checker.limits, checker.preprocess)
                spent["decode"] += time.process_time() - t
                t = time.process_time()
                checker.score_views(viewed)
                spent["preprocess + model + verdict"] += time.process_time() - t
            ms = {k: round(1000 * v / objects, 3) for k, v in spent.items()}
            out.append({"path": name, "objects": objects, "cpu_ms_per_image": ms, "service_cpu_ms": sum(ms.values())})
    os.environ.pop(SWITCH, None)
    return out


# --- a front in its own cluster ---------------------------------------------------------------------------------------
def _config(port: int, before: bool = False) -> dict[str, Any]:
    import yaml

    from deployments.run import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    app["args"]["checker"].update(factory="bench.overhead:null_checker")
    app["args"]["generator"].update(factory="bench.overhead:NullGenerator")
    app["args"]["ingress"]["png_compress_level"] = 6 if before else 1  # Pillow's default, then the shipped one
    for d in app["deployments"]:
        if d["name"] == "SafetyChecker":
            # zero embeddings score -threshold, flagged where a tiny concept's threshold is negative: the loosest
            # adjustment releases every image (the generate path PNG-encodes only what is released)
            d["user_config"].update(policy="stock", adjustment=-1.0)
            d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    return raw


def _child(front: str, plan: OverheadPlan, out: Path) -> None:
    import ray
    from ray import serve

    from deployments.run import config_schema, deploy

    from .load import free_port, start_serving_ray
    from .proxy import _first_request, _haproxy_running, _split_delta

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pictures = photos(plan.images, plan.size)
    bodies = {
        "moderate PNG": encoded(pictures, "PNG"),
        "moderate JPEG": encoded(pictures, "JPEG"),
        "moderate multipart": encoded(pictures, "PNG"),
        "generate": [
            json.dumps({"prompt": "a photo", "width": 512, "height": 512, "steps": 1, "seed": k}).encode()
            for k in range(plan.images)
        ],
    }
    start_serving_ray()  # with the serving settings `diffguard serve` gives its Ray
    rows = []
    try:
        deploy(config_schema(_config(port, before=front.endswith(BEFORE))), timeout_s=600)
        _first_request(f"{base}/v1/moderate", bodies["moderate PNG"][0])
        import httpx

        def split() -> dict[str, Any]:
            return httpx.get(f"{base}/v1/info", timeout=60).json()["checker"]["per_image_ms"]

        for path in PATHS:
            before = split()
            row = drive(base, path, bodies[path], plan.clients, plan.warmup_s, plan.measure_s)
            row.update(front=front, checker_ms=_split_delta(before, split()), haproxy_process=_haproxy_running())
            rows.append(row)
            log.info("overhead %s", row)
    finally:
        serve.shutdown()
        ray.shutdown()
    out.write_text(json.dumps(rows))


def run_overhead(plan: OverheadPlan) -> dict[str, Any]:
    """Every front in a fresh cluster (a child process each), then the scan's stages here."""
    from .proxy import SERVE_ENV, VARIANTS

    rows: list[dict[str, Any]] = []
    for front in plan.fronts:
        env = {k: v for k, v in os.environ.items() if k not in SERVE_ENV}
        env.update(VARIANTS[front.removesuffix(BEFORE)])
        if front.endswith(BEFORE):  # Ray's own default (100 KiB), every image through Pillow
            env.update(RAY_max_direct_call_object_size=str(100 * 1024), DIFFGUARD_FAST_DECODE="0")
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "bench.overhead", "--child", front, "--plan", json.dumps(asdict(plan))]
            done = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0 or not out.exists():
                log.warning("overhead %s failed:\n%s", front, done.stderr[-3000:])
                why = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
                rows.append({"front": front, "skipped": f"failed: {why}"})
                continue
            rows.extend(json.loads(out.read_text()))
    scan = scan_stages(plan.scan_objects, plan.size)
    return {"image": f"{plan.size}x{plan.size} photos", "clients": plan.clients, "rows": rows, "scan": scan}


def section(overhead: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """CPU-ms per image by process, the total without the load generator, and cores per 1,000 images/s."""
    from .report import table

    def cells(r: dict[str, Any], name: str) -> list[Any]:
        ms = r.get("cpu_ms_per_image") or {}
        split = r.get("checker_ms") or {}
        decode = "-" if split.get("decode") is None else f"{split['decode']:.1f}/{split['preprocess']:.1f}"
        total = r.get("service_cpu_ms")
        return [
            name,
            r.get("images_per_s"),
            *(ms.get(k) for k in ROLES),
            decode,
            total,
            None if total is None else total,  # 1,000 images/s × total ms = total cores
            ms.get("load generator"),
            r.get("errors") if "skipped" not in r else r["skipped"],
        ]

    rows = [cells(r, f"{r['front']}: {r.get('path', '-')}") for r in overhead["rows"]]
    for scan in overhead["scan"]:  # in this process: the stages, not Ray Data's scheduling
        stages = ", ".join(f"{k} {v:.1f}" for k, v in scan["cpu_ms_per_image"].items())
        total = scan["service_cpu_ms"]
        rows.append([scan["path"], None, *([None] * len(ROLES)), stages, total, total, None, 0])
    headers = ["front: path", "images/s", *(f"{k} ms" for k in ROLES), "checker decode/pre ms (wall)", "total ms"]
    headers += ["cores per 1k img/s", "load gen ms (excluded)", "errors"]
    title = f"CPU per image outside the model (null model; {overhead['image']}, {overhead['clients']} clients)"
    return title, table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead")
    parser.add_argument("--child", required=True, help="a bench.proxy.VARIANTS front")
    parser.add_argument("--plan", required=True, help="OverheadPlan as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    fields = json.loads(args.plan)
    fields["fronts"] = tuple(fields["fronts"])
    _child(args.child, OverheadPlan(**fields), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
