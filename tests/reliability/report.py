"""Run the long version of every reliability scenario and write ``docs/RELIABILITY.md`` (``make reliability``).

    python -m tests.reliability.report [--soak-s 300] [--quick]
    python -m tests.reliability.report --only adversarial   # one scenario, spliced into the existing report
    python -m tests.reliability.report --only bad-inputs adversarial   # both corpora
    python -m tests.reliability.report --only holes   # issue 25's attacks replayed (no cluster of its own)


Everything runs on this machine, loopback only: a simulated three-node cluster (its own process), then one local
Ray (2 CPUs) with moto's S3 server for the rest. Raw figures go to ``build/reliability/results.json``. The exit code
is 1 when any invariant failed (the report is written either way, with the failure marked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

from .render import render

OUT = ROOT / "docs" / "RELIABILITY.md"
RAW = ROOT / "build" / "reliability" / "results.json"


def scenario(title: str, injected: str, figures: dict[str, Any], invariants: dict[str, bool]) -> dict[str, Any]:
    return {"title": title, "injected": injected, "figures": figures, "invariants": invariants}


def multinode(load_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "multinode.json"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd = [sys.executable, "-m", "tests.reliability.multinode", "--out", str(out), "--load-s", str(load_s)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the multi-node run failed:\n{proc.stderr[-3000:]}")
        r = json.loads(out.read_text())
    ok_place = all(
        set(r[m][d]["pools"]) == {pool}
        for m in ("placement_start", "placement_peak", "placement_end")
        for d, pool in (("Generator", "generation"), ("SafetyChecker", "checking"))
    )
    return scenario(
        "Multi-node cluster: placement and autoscaling",
        f"3 nodes (CPU head; a `generation` and a `checking` worker labelled diffguard.io/pool, with logical GPUs), "
        f"production-shaped config with tiny models; {r['load']['requests']} requests from 16 clients over "
        f"{load_s:g} s, then one client while scaling down",
        r,
        {
            "generators only on generation nodes, checkers only on checking nodes": ok_place,
            "checker scaled up from min_replicas under load": r["peak_replicas"] > 1,
            "checker scaled back to min_replicas after the load": r["scaled_down_to_min_after_load_s"] is not None,
            "every request succeeded while replicas were added and removed": not r["load_disallowed"]
            and not r["trickle_disallowed"],
            "unchecked images out = 0": r["unchecked_images_out"] == 0 and not r["problems"],
        },
    )


def endpoint_faults(port: int, checker: Any, quick: bool) -> list[dict[str, Any]]:
    from .apps import apply, serve_config
    from .faults import absent_checker, broken_checker_load, fault_apps, healthz_under_generation_load, kill_during_load
    from .load import disallowed, verify_samples

    base = f"http://127.0.0.1:{port}"
    apply(serve_config(port, fault_apps()))
    out = []
    clients, after = (8, 5) if quick else (16, 15)
    for deployment in ("SafetyChecker", "Generator"):
        stats, f = asyncio.run(kill_during_load(base, "kill", deployment, clients=clients, after_s=after))
        f["verified_images"] = verify_samples(stats, checker)
        f["unchecked_images_out"] = stats.unchecked_images_out
        out.append(
            scenario(
                f"{deployment} replica killed under load",
                f"`ray.kill` of the only {deployment} replica after 3 s of load from {clients} clients",
                f,
                {
                    "statuses only 200 or 503": not disallowed(stats, {"200", "503"}),
                    "every 503 has Retry-After": stats.missing_retry_after == 0,
                    "unchecked images out = 0": stats.unchecked_images_out == 0 and not stats.problems,
                    "replaced by Serve without help": f["replacement_running_after_s"] is not None,
                    "all requests succeed after recovery": f["after_recovery"]["non_200"] == 0,
                },
            )
        )
    broken = {
        "raising": "a checker that raises on every call",
        "slow": "a checker slower (3 s) than the ingress's checker timeout (1 s)",
    }
    for name, what in broken.items():
        stats, f = asyncio.run(broken_checker_load(base, name, clients=clients, duration_s=10 if quick else 30))
        out.append(
            scenario(
                f"Checker {name}",
                f"{what}, under load from {clients} clients",
                f,
                {
                    "every request 503 with Retry-After": set(stats.statuses()) == {"503"}
                    and stats.missing_retry_after == 0,
                    "unchecked images out = 0": stats.images_out == 0 and stats.unchecked_images_out == 0,
                },
            )
        )
    stats, f = asyncio.run(healthz_under_generation_load(base, clients=clients, duration_s=10 if quick else 60))
    f["verified_images"] = verify_samples(stats, checker)
    f["unchecked_images_out"] = stats.unchecked_images_out
    out.append(
        scenario(
            "/healthz under full generation load",
            f"{clients} clients keep a generator that takes 2 s a render saturated (its 2 ongoing slots held, the "
            "rest queued) while /healthz is probed every 0.1 s with a 5 s client timeout",
            f,
            {
                "every probe answered 200": f["probe_statuses"] == {"200": f["probes"]},
                "p99 under 1 s": f["healthz_p99_ms"] is not None and f["healthz_p99_ms"] < 1000,
                "unchecked images out = 0": stats.unchecked_images_out == 0 and not stats.problems,
            },
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        gate = Path(tmp) / "gate"
        apply(serve_config(port, fault_apps(gate)), wait=False)
        stats, f = asyncio.run(absent_checker(base, gate, duration_s=6 if quick else 15))
    f.pop("after_ready_bodies")
    out.append(
        scenario(
            "Checker absent at start-up",
            "the checker's replica cannot start (its constructor waits for a gate file); load meanwhile; then the "
            "gate opens",
            f,
            {
                "/healthz not ready while absent": f["healthz_before"][0] == 503 and f["healthz_during"][0] == 503,
                "generate and moderate refused (503)": set(stats.statuses()) == {"503"},
                "unchecked images out = 0": stats.images_out == 0,
                "ready by itself once the checker exists": f["after_ready"] == [200, 200],
            },
        )
    )
    from ray import serve

    serve.shutdown()
    return out


def soak_run(port: int, checker: Any, soak_s: float) -> dict[str, Any]:
    from ray import serve

    from .apps import apply
    from .load import disallowed, verify_samples
    from .soak import soak, soak_config

    apply(soak_config(port))
    stats, f = asyncio.run(soak(f"http://127.0.0.1:{port}", clients=64, duration_s=soak_s))
    f["verified_images"] = verify_samples(stats, checker)
    f["unchecked_images_out"] = stats.unchecked_images_out
    serve.shutdown()
    return scenario(
        "Load soak",
        f"64 concurrent clients, 3:1 moderate:generate, {soak_s:g} s (after a warm-up), loopback; the generator "
        "queues at most 16 requests, so overload is shed",
        f,
        {
            "statuses only 200 or 503": not disallowed(stats, {"200", "503"}),
            "every 503 has Retry-After": stats.missing_retry_after == 0,
            "unchecked images out = 0": stats.unchecked_images_out == 0 and not stats.problems,
            "no replica replaced": not any(f["replicas_replaced"].values()),
            "memory flat in the second half (< 64 MiB per replica)": all(
                v < 64 for v in f["memory_mib_growth_second_half"].values()
            ),
        },
    )


def scan_runs(endpoint: str, checker: Any, quick: bool) -> list[dict[str, Any]]:
    import boto3

    from tests.integration.scan_support import checker_at, mixed_adjustment, png

    from .scan_faults import BAD, faulty_s3_scan, sigkill_trials

    s3 = boto3.client("s3", endpoint_url=endpoint)
    n = 12 if quick else 24
    images = {f"imgs/{i:03d}.png": png(900 + i) for i in range(n)}
    adjustment = mixed_adjustment(checker, list(images.values()))
    expected = {k: v.nsfw for k, v in zip(images, checker_at(adjustment).check(list(images.values())), strict=True)}
    trials, scoring, kills = (9, 1, 1) if quick else (20, 5, 2)
    r = sigkill_trials(s3, endpoint, images, adjustment, expected, trials, scoring, kills)
    records = r.pop("records")
    r["trials_detail"] = [
        {"phase": t["phase"], "killed_on": [k["killed_on"] for k in t["kills"]], "violations": t["violations"]}
        for t in records
    ]
    r["violations"] = {k: sum(t["violations"].get(k, 0) for t in records) for k in BAD}
    r["kills_landed"] = sum(k is not None for t in r["trials_detail"] for k in t["killed_on"])  # a later run may
    # finish before its kill point (it has less left to do): it then completes, and the audit still applies
    out = [
        scenario(
            "Scan SIGKILLed at random points, then rerun",
            f"{r['trials']} trials on {n} objects with --quarantine --apply; in each, up to {kills} successive runs "
            f"SIGKILLed (process group) at a random one of their storage writes (~{r['mutating_requests_per_run']} "
            "in a whole run), then a completing rerun",
            r,
            {
                "every trial's first run killed mid-run": all(t["killed_on"][0] for t in r["trials_detail"]),
                "every rerun completed": all(t["rerun_rc"] == 0 for t in records),
                "one current row per object; every object scored": all(
                    not {"duplicate_rows", "missing_rows", "unscored", "wrong_verdicts"} & set(t["violations"])
                    for t in records
                ),
                "lost objects = 0, duplicated objects = 0 (quarantine included)": all(
                    not {"lost_objects", "duplicated_objects", "misplaced_objects"} & set(t["violations"])
                    for t in records
                ),
                "every quarantine move recorded, no journal left": all(not t["violations"] for t in records),
            },
        )
    ]
    for rate in (0.1,) if quick else (0.1, 0.25):
        kinds = ("500", "503-slowdown", "drop", "drop-after", "truncate")
        f = faulty_s3_scan(s3, endpoint, images, adjustment, expected, rate=rate, kinds=kinds, seed=int(rate * 100))
        out.append(
            scenario(
                f"Scan through transient S3 faults ({rate:.0%} of requests)",
                "a proxy in front of moto answering 500, 503 SlowDown, closing connections before or after the "
                f"request reached S3, or cutting GET bodies, on {rate:.0%} of {n}-object scan's requests",
                f,
                {
                    "the job completed": f["rc"] == 0,
                    "every object scored": bool(f["summary"]) and f["summary"]["errors"] == 0,
                    "lost = 0, duplicated = 0, one row per object": not f["violations"],
                },
            )
        )
    return out


SPLICED = "Regenerated since, alone:"


def splice(existing: str, meta: dict[str, Any], scenarios: list[dict[str, Any]], after: str | None = None) -> str:
    """``existing`` (a rendered report) with each scenario's summary row and section replaced; a new one is added
    after scenario ``after``'s row and section (where a full run puts it), else at the end of the summary table and of
    the document. The header says which sections were regenerated alone, when and how."""
    from .render import section, summary

    rows = summary(scenarios).splitlines()[2:]
    lines = existing.rstrip("\n").split("\n")
    for s, row in zip(scenarios, rows, strict=True):
        at = [i for i, line in enumerate(lines) if line.startswith(f"| {s['title']} |")]
        if at:
            lines[at[0]] = row
        else:  # after the row of the scenario it follows in a full run, or at the end of the summary table
            start = lines.index("## Summary")
            end = next(i for i in range(start + 3, len(lines)) if not lines[i].startswith("|"))
            prev = [i for i in range(start, end) if after and lines[i].startswith(f"| {after} |")]
            lines.insert(prev[0] + 1 if prev else end, row)
    text = "\n".join(lines) + "\n"
    for s in scenarios:
        new = section(s) + "\n"
        head = f"## {s['title']}\n"
        if head in text:
            start = text.index(head)
            nxt = text.find("\n## ", start + len(head))
            text = text[:start] + new + ("\n" + text[nxt + 1 :] if nxt != -1 else "")
        elif after and f"\n## {after}\n" in text:  # before the section that follows ``after``'s
            start = text.index(f"\n## {after}\n") + 1
            nxt = text.find("\n## ", start + 1)
            text = text[: nxt + 1] + new + "\n" + text[nxt + 1 :] if nxt != -1 else text.rstrip("\n") + "\n\n" + new
        else:
            text = text.rstrip("\n") + "\n\n" + new
    titles = ", ".join(f"“{s['title']}”" for s in scenarios)
    note = (
        f"{SPLICED} {titles} by `{meta['command']}` on {meta['generated']} "
        f"({meta['machine']}; {meta['seconds']} s; raw figures in `build/reliability/<name>.json`); every other "
        "section is from the run above."
    )
    lines = text.split("\n")
    current = {s["title"] for s in scenarios}  # an earlier note is dropped only when all its sections are redone now
    lines = [line for line in lines if not line.startswith(SPLICED) or not set(re.findall("“(.*?)”", line)) <= current]
    first = next(i for i, line in enumerate(lines) if line.startswith("Generated by"))
    lines.insert(first + 1, note)
    return "\n".join(lines)


def attempt(title: str, fn: Any, *args: Any) -> list[dict[str, Any]]:
    """Run one scenario (or a group); a crash becomes a failed scenario in the report instead of ending the run."""
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported, and the exit code says so
        logging.exception("%s crashed", title)
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        return [scenario(title, "(the scenario crashed)", {"error": repr(exc)[:2000]}, {"ran to completion": False})]
    return result if isinstance(result, list) else [result]


def main() -> int:
    parser = argparse.ArgumentParser(description="run the reliability scenarios and write docs/RELIABILITY.md")
    parser.add_argument("--soak-s", type=float, default=300, help="seconds of soak (after a warm-up)")
    parser.add_argument("--quick", action="store_true", help="CI-sized scenarios (a smoke run of the report)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["bad-inputs", "adversarial", "holes"],
        help="run only these scenarios and splice their sections and summary rows into the existing report",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    from .adversarial import adversarial_scenario
    from .bad_inputs import corpus_scenario
    from .holes import holes_scenario

    scenarios = [] if args.only else attempt("Multi-node cluster", multinode, 30 if args.quick else 90)
    if args.only == ["holes"]:  # its tests start their own Ray and moto
        return _write(args, [*scenarios, *attempt("Holes closed", holes_scenario)], started)
    import ray
    from moto.server import ThreadedMotoServer

    from pipeline import SafetyChecker
    from tests.integration import scan_support  # noqa: F401 - sets the fake AWS credentials before Ray starts
    from tests.integration.conftest import free_port

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        checker = SafetyChecker.load("tiny", "cpu", "float32")
        host, port = moto.get_host_and_port()
        s3 = f"http://{host}:{port}"
        size = "ci" if args.quick else "report"
        if not args.only or "bad-inputs" in args.only:
            scenarios += attempt("Bad-input corpus", corpus_scenario, free_port(), checker)
        if not args.only or "adversarial" in args.only:
            scenarios += attempt("Adversarial corpus", adversarial_scenario, free_port(), s3, size)
        if not args.only:
            scenarios += attempt("Endpoint faults", endpoint_faults, free_port(), checker, args.quick)
            scenarios += attempt("Load soak", soak_run, free_port(), checker, 30 if args.quick else args.soak_s)
            scenarios += attempt("Scan faults", scan_runs, s3, checker, args.quick)
    finally:
        ray.shutdown()
        moto.stop()
    if not args.only or "holes" in args.only:
        scenarios += attempt("Holes closed", holes_scenario)
    return _write(args, scenarios, started)


def _write(args: argparse.Namespace, scenarios: list[dict[str, Any]], started: float) -> int:
    import ray

    meta = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": (
            f"python -m tests.reliability.report --only {' '.join(args.only)}" if args.only else "make reliability"
        )
        + (" (--quick)" if args.quick else ""),
        "machine": f"{os.cpu_count()} CPUs, {_memory_gib()} GiB, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, Ray {ray.__version__}",
        "seconds": round(time.monotonic() - started),
    }
    raw = RAW.with_name(f"{'-'.join(args.only)}.json") if args.only else RAW
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"meta": meta, "scenarios": scenarios}, indent=2, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.out.exists():
        after = "Bad-input corpus" if args.only != ["holes"] else "Scan through transient S3 faults (25% of requests)"
        args.out.write_text(splice(args.out.read_text(), meta, scenarios, after=after))
    else:
        args.out.write_text(render(meta, scenarios))
    failed = [s["title"] for s in scenarios if not all(s["invariants"].values())]
    print(f"wrote {args.out} ({len(scenarios)} scenarios, {meta['seconds']} s); failed: {failed or 'none'}")
    return 1 if failed else 0


def _memory_gib() -> int:
    import psutil

    return round(psutil.virtual_memory().total / 2**30)


if __name__ == "__main__":
    sys.exit(main())
