"""The bad-input corpus as a report scenario: every case through the core check, ``/v1/moderate`` (raw and
multipart), ``/v1/generate`` and the scan, compared with its documented outcome; the service must be healthy after.
(The per-case assertions are in ``tests/integration/test_bad_inputs.py``.)"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tests.corpus import generate_cases, image_cases, moderate_cases

from .apps import TINY, app, apply, replicas, serve_config
from .load import Call, LoadStats, audit, verify_samples

MAX_BODY = 2_000_000
DEPLOYMENTS = ("Ingress", "SafetyChecker", "Generator")


def _as_documented(case: Any, error: str | None, scores: list) -> bool:
    if case.error is None:
        return error is None and len(scores) == 17
    return error is not None and re.search(case.error, error) is not None and not scores


def corpus_scenario(port: int, checker: Any) -> dict[str, Any]:
    from ray import serve

    from .scan_faults import scan_here

    cases = image_cases()
    apply(serve_config(port, [app("bad", checker=TINY, generator=TINY, ingress={"max_body_bytes": MAX_BODY})]))
    before = {d: {r["replica_id"] for r in replicas("bad", d)} for d in DEPLOYMENTS}
    results: dict[str, list[tuple[str, bool]]] = {}
    results["core check"] = [
        (c.name, _as_documented(c, v.error, v.concept_scores))
        for c, v in zip(cases, checker.check([c.data for c in cases]), strict=True)
    ]
    stats = LoadStats()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/bad", timeout=300) as client:
        files = [("files", (c.filename, c.data, c.content_type)) for c in cases]
        rows = client.post("/v1/moderate", files=files).json()["results"]
        results["/v1/moderate multipart"] = [
            (c.name, _as_documented(c, row["error"], row["concept_scores"])) for c, row in zip(cases, rows, strict=True)
        ]
        raw = []
        for c in cases:
            r = client.post("/v1/moderate", content=c.data, headers={"Content-Type": c.content_type})
            if c.error is None:
                good = r.status_code == 200 and _as_documented(c, None, r.json()["results"][0]["concept_scores"])
            else:
                good = r.status_code == 400 and re.search(c.error, r.json()["error"]) is not None
            raw.append((c.name, good))
        results["/v1/moderate raw body"] = raw
        for route, http_cases in (("moderate", moderate_cases(MAX_BODY)), ("generate", generate_cases(MAX_BODY))):
            out = []
            for c in http_cases:
                r = client.post(c.route, **c.request())
                good = r.status_code == c.status and "image_png_base64" not in (r.text if c.status != 200 else "")
                if good and c.status != 200:
                    good = re.search(c.message, r.json()["error"]) is not None
                if good and c.status == 200 and route == "generate":
                    audit(stats, Call("generate", c.route, lambda i: {}, 1), r)
                out.append((c.name, good))
            results[f"/v1/{route} requests"] = out
        health = client.get("/healthz")
    after = {d: {r["replica_id"] for r in replicas("bad", d)} for d in DEPLOYMENTS}
    serve.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus"
        src.mkdir()
        for c in cases:
            (src / c.filename).write_bytes(c.data)
        args = [str(src), "--output", str(Path(tmp) / "out"), "--json", "--dtype", "float32", "--device", "cpu"]
        rc, _ = scan_here(args)
        from pipeline.scan import read_current

        by_key = {r["key"]: r for r in read_current(str(Path(tmp) / "out")).to_pylist()}
    missing = {"error": "no row", "concept_scores": []}
    rows = [by_key.get(c.filename, missing) for c in cases]
    results["scan"] = [
        (c.name, _as_documented(c, r["error"], r["concept_scores"])) for c, r in zip(cases, rows, strict=True)
    ]
    verified = verify_samples(stats, checker)
    figures = {
        "image_cases": len(cases),
        "request_cases": len(moderate_cases(MAX_BODY)) + len(generate_cases(MAX_BODY)),
        "as_documented": {where: f"{sum(g for _, g in r)}/{len(r)}" for where, r in results.items()},
        "mismatches": {where: [n for n, g in r if not g] for where, r in results.items() if not all(g for _, g in r)},
        "scan_rc": rc,
        "healthz_after": health.status_code,
        "replicas_replaced": sum(len(before[d] - after[d]) for d in DEPLOYMENTS),
        "verified_images": verified,
        "unchecked_images_out": stats.unchecked_images_out,
        "cases": [(c.name, c.error or "scored") for c in cases],
    }
    return {
        "title": "Bad-input corpus",
        "injected": f"{len(cases)} hostile or unusual images and {figures['request_cases']} malformed or odd "
        "requests (tests/corpus.py), through every entry point",
        "figures": figures,
        "invariants": {
            "every case got its documented status or error row": not figures["mismatches"] and rc == 0,
            "service healthy after the corpus, no replica replaced": health.status_code == 200
            and figures["replicas_replaced"] == 0,
            "unchecked images out = 0": stats.unchecked_images_out == 0 and not stats.problems,
        },
    }
