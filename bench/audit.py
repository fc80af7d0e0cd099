"""The audit log's cost on the served path (issue 28): ``/v1/moderate`` at 32 clients without and with ``audit_dest``.

One local Ray, one moderation-only app (the ``service`` section's ``batched`` one: local.yaml, the ViT-B/32-sized
checker, one checker replica, no generator). Each window deploys the app afresh, without the audit log or with
``audit_dest`` set to a temporary directory (a fresh one per audited window; nothing else changes), then drives it
with closed-loop clients posting one 512x512 PNG each (raw body), and deletes it. The windows alternate (without,
with, without, with, ...) so drift on a shared machine hits both alike. Afterwards each audited window's table is read
back with :func:`pipeline.audit.read`: every request answered 200 in that window's run (warm-up included) must have
exactly one row with its request id, or the benchmark fails. Groups (Delta commits) and rows per group come from the
table's history.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench")

APP = "batched"  # the service section's moderation-only app, deployed alone
BASE = "without"  # the variants, in the order each round runs them
AUDITED = "with audit log"


@dataclass(frozen=True)
class AuditPlan:
    clients: int = 32  # concurrent closed-loop clients
    warmup_s: float = 4
    measure_s: float = 10
    rounds: int = 2  # each round runs without, then with the audit log (A B A B ...)
    images: int = 64  # distinct PNGs the clients cycle through
    size: int = 512
    commit_groups: int = 200  # then the group commit alone in this process: groups of the served rows/group


def audit_config(port: int, checker_dir: Path, dest: str | None) -> dict[str, Any]:
    """The service section's ``batched`` app alone, with ``audit_dest: dest`` (None: no audit log)."""
    from .service import ServicePlan, serve_config

    raw = serve_config(port, checker_dir, ServicePlan(clients=(), warmup_s=0, measure_s=0))
    raw["applications"] = [a for a in raw["applications"] if a["name"] == APP]
    raw["applications"][0]["args"]["ingress"]["audit_dest"] = dest
    return raw


def run_audit_bench(plan: AuditPlan) -> dict[str, Any]:
    """Every window in one fresh local Ray; then the audited tables read back and checked against the answers."""
    import ray
    from ray import serve

    from . import models
    from .load import free_port, start_serving_ray

    checker_dir = models.model_dir("vit-b-32")
    bodies = models.pngs(models.images(plan.images, seed=3, size=plan.size))
    port = free_port()
    rows: list[dict[str, Any]] = []
    start_serving_ray()  # with the serving settings `diffguard serve` gives its Ray
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        try:
            for round_ in range(plan.rounds):
                for variant in (BASE, AUDITED):
                    dest = str(Path(tmp, f"round-{round_}")) if variant == AUDITED else None
                    row = _window(port, checker_dir, dest, bodies, plan)
                    row.update(variant=variant, round=round_, dest=dest)
                    rows.append(row)
                    log.info("audit %s", {k: v for k, v in row.items() if k != "answered_ids"})
        finally:
            serve.shutdown()
            ray.shutdown()
        for row in rows:
            if row["dest"] is not None:
                row.update(_check_table(row))
    for row in rows:
        row.pop("answered_ids")
        row.pop("dest")
    out = _summarise(rows, plan)
    per_group = [r["audit_rows_per_group"] for r in rows if r["variant"] == AUDITED]
    out["commit"] = commit_cost(max(1, round(sum(per_group) / len(per_group))), plan.commit_groups)
    return out


def _window(port: int, checker_dir: Path, dest: str | None, bodies: list[bytes], plan: AuditPlan) -> dict[str, Any]:
    """Deploy the app (with ``dest`` as its audit log), check it says so, drive it, delete it."""
    import httpx
    from ray import serve

    from deployments.run import config_schema, deploy, wait_healthy

    started = time.perf_counter()
    deploy(config_schema(audit_config(port, checker_dir, dest)), timeout_s=600)
    base = f"http://127.0.0.1:{port}/{APP}"
    wait_healthy(f"{base}/healthz", timeout_s=120)
    enabled = httpx.get(f"{base}/v1/info", timeout=60).json()["audit"]["enabled"]
    if enabled != (dest is not None):
        raise RuntimeError(f"the app deployed with audit_dest={dest!r} reports audit enabled={enabled}")
    deployed_s = time.perf_counter() - started
    try:
        row = _drive(f"{base}/v1/moderate", bodies, plan)
    finally:
        serve.delete(APP)
    row["deploy_s"] = round(deployed_s, 1)
    return row


def _drive(url: str, bodies: list[bytes], plan: AuditPlan) -> dict[str, Any]:
    """:mod:`bench.load`'s closed loop, keeping every 200's request id (warm-up and tail too: each has a row)."""
    import httpx

    from .load import _drive as closed_loop
    from .load import _summary

    answered: list[str] = []

    async def drive() -> tuple[list[Any], tuple[float, float]]:
        limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def send(body: bytes) -> tuple[bool, int | None]:
                try:
                    r = await client.post(url, content=body, headers={"content-type": "image/png"})
                    if r.status_code != 200:
                        return False, None
                    answer = r.json()
                    answered.append(answer["request_id"])
                    return True, answer["results"][0]["batch_size"]
                except (httpx.HTTPError, ValueError, KeyError):
                    return False, None

            return await closed_loop(send, bodies, plan.clients, plan.warmup_s, plan.measure_s)

    wall_minus_perf = time.time() - time.perf_counter()  # the window's bounds on the clock Delta commits carry
    samples, window = asyncio.run(drive())
    row = _summary(plan.clients, samples, window)
    row["window_epoch_s"] = [w + wall_minus_perf for w in window]
    row["answered"] = len(answered)
    row["answered_ids"] = answered
    return row


def _check_table(row: dict[str, Any]) -> dict[str, Any]:
    """The audited window's table against its answers: one status-200 row per answered request id, no other; its
    groups (Delta commits), rows, and those committed inside the measured window."""
    from pipeline.audit import open_log, read
    from pipeline.audit.table import location

    table = read(row["dest"])
    ok_ids = [r["request_id"] for r in table if r["status"] == 200]
    answered = row["answered_ids"]
    missing = set(answered) - set(ok_ids)
    extra = set(ok_ids) - set(answered)
    if missing or extra or len(ok_ids) != len(answered):
        raise RuntimeError(
            f"audit log {row['dest']}: {len(answered)} requests answered 200 but {len(ok_ids)} status-200 rows; "
            f"{len(missing)} answered requests lack a row (e.g. {sorted(missing)[:3]}), {len(extra)} rows answer no "
            f"request (e.g. {sorted(extra)[:3]}), {len(ok_ids) - len(set(ok_ids))} duplicates"
        )
    lo, hi = row["window_epoch_s"]
    history = open_log(location(row["dest"])).history()
    writes = [h for h in history if h["operation"] == "WRITE"]
    inside = [h for h in writes if lo <= h["timestamp"] / 1000 <= hi]
    inside_rows = sum(h["operationMetrics"]["num_added_rows"] for h in inside)
    return {
        "audit_rows": len(table),
        "audit_rows_ok": len(ok_ids),
        "audit_groups": len(writes),
        "audit_rows_per_group": len(table) / len(writes),
        "window_groups_per_s": len(inside) / (hi - lo),
        "window_rows_per_group": inside_rows / len(inside) if inside else None,
        "compactions": sum(1 for h in history if h["operation"] == "OPTIMIZE"),
    }


def commit_cost(rows_per_group: int, groups: int) -> dict[str, Any]:
    """:class:`pipeline.audit.AuditLog` alone in this process: ``groups`` groups of ``rows_per_group`` moderate rows
    (one image each, as the served rows), each group's rows recorded at once; wall and CPU milliseconds per group."""
    from datetime import UTC, datetime

    from pipeline.audit import AuditLog

    image = {
        "sha256": "0" * 64,
        "filename": None,
        "nsfw": False,
        "flagged": [],
        "categories": "{" + ", ".join(f'"concept_{i}": 0.01' for i in range(17)) + "}",
        "action": "allow",
        "views": 1,
        "error": None,
    }

    def row(i: int) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC),
            "request_id": f"bench-{i}",
            "key_id": None,
            "tenant": "default",
            "route": "moderate",
            "status": 200,
            "latency_ms": 1000.0,
            "prompt_sha256": None,
            "prompt": None,
            "seed": None,
            "params": None,
            "images": [image],
            "policy": "stock",
            "policy_fingerprint": "f" * 16,
            "models": '{"checker": {}}',
            "error": None,
        }

    async def run(audit: AuditLog) -> list[float]:
        waits = []
        for g in range(groups):
            start = time.perf_counter()
            await asyncio.gather(*(audit.record(row(g * rows_per_group + i)) for i in range(rows_per_group)))
            waits.append(time.perf_counter() - start)
        return waits

    with tempfile.TemporaryDirectory(prefix="bench-audit-commit-") as tmp:
        audit = AuditLog(tmp, replica="bench")
        cpu, wall = time.process_time(), time.perf_counter()
        waits = asyncio.run(run(audit))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        audit.close()
        with audit._compacting:  # a compaction started by the last group ends before its directory goes
            pass
        if audit.rows != groups * rows_per_group or audit.groups != groups:
            raise RuntimeError(f"{audit!r}: expected {groups} groups of {rows_per_group} rows")
    return {
        "groups": groups,
        "rows_per_group": rows_per_group,
        "max_delay_ms": 1000 * audit.max_delay_s,
        "wait_ms_p50": 1000 * float(np.percentile(waits, 50)),
        "wait_ms_p99": 1000 * float(np.percentile(waits, 99)),
        "cpu_ms_per_group": 1000 * cpu / groups,
        "wall_ms_per_group": 1000 * wall / groups,
        "compactions": audit.compactions,
    }


def _summarise(rows: list[dict[str, Any]], plan: AuditPlan) -> dict[str, Any]:
    base = {r["round"]: r["images_per_s"] for r in rows if r["variant"] == BASE}
    for r in rows:
        r["x_without"] = r["images_per_s"] / base[r["round"]] if base[r["round"]] else None

    def mean(variant: str, key: str) -> float:
        values = [r[key] for r in rows if r["variant"] == variant]
        return sum(values) / len(values)

    ratio = mean(AUDITED, "images_per_s") / mean(BASE, "images_per_s")
    return {
        "model": "ViT-B/32",
        "image": f"{plan.size}x{plan.size} PNG, one per request (raw body)",
        "clients": plan.clients,
        "window_s": [plan.warmup_s, plan.measure_s],
        "rows": rows,
        "images_per_s": {BASE: mean(BASE, "images_per_s"), AUDITED: mean(AUDITED, "images_per_s")},
        "ratio": ratio,
        "cost": 1 - ratio,
    }


def section(audit: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """One row per window, in the order run; the title carries the mean ratio with/without."""
    from .report import pct, table

    rows = [
        [
            r["variant"],
            r["round"],
            r["images_per_s"],
            r["p50_ms"],
            r["p99_ms"],
            r["mean_batch"],
            r["x_without"],
            r["answered"],
            r.get("audit_rows"),
            r.get("audit_groups"),
            r.get("audit_rows_per_group"),
            r.get("window_groups_per_s"),
            r["errors"],
        ]
        for r in audit["rows"]
    ]
    headers = ["audit log", "round", "images/s", "p50 ms", "p99 ms", "batch", "x without", "answered 200", "rows"]
    headers += ["groups", "rows/group", "groups/s (window)", "err"]
    c = audit["commit"]
    title = (
        f"The audit log on /v1/moderate ({audit['model']}, {audit['image']}, {audit['clients']} clients): "
        f"with / without {audit['ratio']:.3f}x (cost {pct(audit['cost'])}); every answered request has its row; "
        f"group commit alone ({c['rows_per_group']} rows/group, {c['groups']} groups): wait p50 {c['wait_ms_p50']:.1f} "
        f"/ p99 {c['wait_ms_p99']:.1f} ms, {c['cpu_ms_per_group']:.1f} CPU ms per group"
    )
    return title, table(headers, rows)


def targets(audit: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": f"the audit log costs <= 10% of served images/s at {audit['clients']} clients",
            "measured": f"{100 * audit['cost']:.1f}% (with / without {audit['ratio']:.3f}x)",
            "met": audit["cost"] <= 0.10,
        }
    ]
