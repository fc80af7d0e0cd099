"""The Grafana dashboard (k8s/dashboard.py, k8s/dashboard_panels.py -> k8s/monitoring/dashboard.json): in sync, a
dashboard model the SDK loads, laid out without overlaps, with every panel issue 29 names, every query valid PromQL
(the real promtool) that sums Ray's per-worker labels away, and every series a known one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from k8s import dashboard

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = "/usr/bin/promtool"
NO_PROMTOOL = "promtool is missing: `apt-get install prometheus` (Debian ships it there); .ci/run installs it"

_HIST = ("_bucket", "_sum", "_count")
# Series the dashboard may use: the issue 29 metric contract, Ray Serve's own (seen in a live scrape of Ray 2.60) and
# the DCGM exporter's. The live test (tests/e2e) checks the ones a running service exports.
SERVICE = {
    "ray_diffguard_requests_total",
    *(f"ray_diffguard_moderation_latency_s{s}" for s in _HIST),
    "ray_diffguard_images_scored_total",
    "ray_diffguard_images_flagged_total",
    "ray_diffguard_image_actions_total",
    "ray_diffguard_images_unscorable_total",
    *(f"ray_diffguard_checker_batch_size{s}" for s in _HIST),
    "ray_diffguard_images_generated_total",
    *(f"ray_diffguard_generator_batch_{what}{s}" for what in ("images", "requests") for s in _HIST),
    "ray_diffguard_generator_queue_images",
    "ray_diffguard_generator_inflight_images",
    "ray_diffguard_keys_reload_failures_total",
    "ray_diffguard_audit_failures_total",
    "ray_diffguard_quota_unavailable_total",
}
SCAN = {
    *(f"ray_diffguard_scan_objects_{stage}_total" for stage in ("listed", "read", "scored", "flagged")),
    "ray_diffguard_scan_errors_total",
    "ray_diffguard_scan_bytes_read_total",
    "ray_diffguard_scan_quarantine_failures_total",
    "ray_diffguard_scan_running",
    "ray_diffguard_scan_last_progress_timestamp_seconds",
}
SERVE = {
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_deployment_queued_queries",
    "ray_serve_replica_processing_queries",
}
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
KNOWN = SERVICE | SCAN | SERVE | DCGM

UNITS = {"s", "percentunit", "percent", "bytes", "Bps", "ops", "reqps", "short"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_KEYWORDS |= {"sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "group"}


def _names(expr: str) -> tuple[str, list[re.Match[str]]]:
    """``expr`` without strings, label matchers, durations and label lists; and its identifiers that are not
    functions (followed by ``(``)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    words = re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*\b(?!\s*\()", text)
    return text, [w for w in words if w.group() not in _KEYWORDS]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects."""
    return {w.group() for w in _names(expr)[1]}


def unaggregated(expr: str) -> list[str]:
    """Series names in ``expr`` outside any aggregation (sum, max, ...): they would keep Ray's per-worker labels."""
    text, words = _names(expr)
    agg = re.compile(r"\b(sum|max|min|avg|count)\s*(by|without)?\s*$")
    out, inside = [], []  # inside: per open parenthesis, whether it holds an aggregation's argument
    for token in sorted([*words, *re.finditer(r"[()]", text)], key=lambda m: m.start()):
        if token.group() == "(":
            inside.append(bool(agg.search(text[: token.start()])))
        elif token.group() == ")":
            inside.pop()
        elif not any(inside):
            out.append(token.group())
    return out


@pytest.fixture(scope="module")
def model() -> dict:
    return json.loads((ROOT / "k8s/monitoring/dashboard.json").read_text())


def panels(model: dict) -> list[dict]:
    return [p for p in model["panels"] if p["type"] != "row"]


# --- the committed JSON ---
def test_dashboard_json_is_in_sync_with_its_source():
    assert dashboard.main(["--check"]) == 0, "run `python -m k8s.dashboard`"


def test_check_fails_on_a_stale_json_and_a_rewrite_fixes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dashboard, "OUTPUT", tmp_path / "dashboard.json")
    (tmp_path / "dashboard.json").write_text('{"title": "hand-edited"}\n')
    assert dashboard.main(["--check"]) == 1
    assert "k8s/monitoring/dashboard.json: differs" in capsys.readouterr().err
    assert dashboard.main([]) == 0 and dashboard.main(["--check"]) == 0
    assert (tmp_path / "dashboard.json").read_text() == dashboard.render()
    assert dashboard.main(["--bogus"]) == 2


def test_output_is_deterministic(model):
    assert dashboard.render() == dashboard.render()
    assert model["uid"] == "diffguard-overview" and model["title"] == "diffguard"
    assert not {"id", "version", "iteration", "created", "updated"} & set(model), "no server-side or time fields"


def test_the_sdk_loads_the_json_back_unchanged(model):
    assert json.loads(json.dumps(Dashboard.from_json(model), cls=JSONEncoder)) == model


def test_panels_query_the_datasource_variable_with_units_and_unique_ids(model):
    assert model["schemaVersion"] >= 39
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)), ids
    for p in panels(model):
        where = f"panel {p['title']!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["fieldConfig"]["defaults"]["unit"] in UNITS, where
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and all(t["expr"] for t in p["targets"]) and len(set(refs)) == len(refs), where
        assert p.get("description"), where


def test_grid_positions_fit_24_columns_and_never_overlap(model):
    cells: dict[tuple[int, int], str] = {}
    for p in model["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} at {(x, y)}"
                cells[(x, y)] = p["title"]


def test_template_variables(model):
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("application", "tenant", "dest", "namespace"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}", name
        assert v["query"].startswith("label_values(") and v["includeAll"] and v["allValue"] == ".*", name
    used = {m for _, expr in dashboard.queries() for m in re.findall(r"\$(\w+)", expr)}
    assert used == {"__rate_interval", "application", "tenant", "dest", "namespace"}, used
    with pytest.raises(ValueError, match=r"unknown Grafana variable \$cluster"):
        dashboard.concrete('up{cluster=~"$cluster"}')


# --- what is on it ---
# (words in a panel title, a series its queries must use, a label they must group by or None)
ISSUE_PANELS = [
    ("requests and status by route", "ray_diffguard_requests_total", "route"),
    ("scored and flagged by category", "ray_diffguard_images_flagged_total", "concept"),
    ("scored and flagged by category", "ray_diffguard_images_scored_total", None),
    ("action mix", "ray_diffguard_image_actions_total", "action"),
    ("checker batch size", "ray_diffguard_checker_batch_size_bucket", "le"),
    ("generator batch size", "ray_diffguard_generator_batch_images_bucket", "le"),
    ("generator batch size", "ray_diffguard_generator_batch_requests_bucket", "le"),
    ("latency percentiles by route", "ray_diffguard_moderation_latency_s_bucket", "route"),
    ("unscorable share by reason", "ray_diffguard_images_unscorable_total", "reason"),
    ("replicas by deployment", "ray_serve_deployment_replica_healthy", "deployment"),
    ("replicas by deployment", "ray_serve_autoscaling_target_replicas", "deployment"),
    ("generator queue", "ray_diffguard_generator_queue_images", None),
    ("generator queue", "ray_diffguard_generator_inflight_images", None),
    ("audit, keys and quota failures", "ray_diffguard_audit_failures_total", None),
    ("audit, keys and quota failures", "ray_diffguard_keys_reload_failures_total", None),
    ("audit, keys and quota failures", "ray_diffguard_quota_unavailable_total", None),
    ("scan objects per stage", "ray_diffguard_scan_objects_read_total", "dest"),
    ("scan errors by kind", "ray_diffguard_scan_errors_total", "kind"),
    ("scan bytes read", "ray_diffguard_scan_bytes_read_total", None),
    ("scan running", "ray_diffguard_scan_running", None),
    ("time since last scan progress", "ray_diffguard_scan_last_progress_timestamp_seconds", None),
    ("gpu utilisation by pod", "DCGM_FI_DEV_GPU_UTIL", "pod"),
    ("gpu memory used by pod", "DCGM_FI_DEV_FB_USED", "gpu"),
]


@pytest.mark.parametrize(("words", "series", "label"), ISSUE_PANELS, ids=[f"{w}:{s}" for w, s, _ in ISSUE_PANELS])
def test_every_panel_the_issue_names_exists(words, series, label):
    exprs = [expr for title, expr in dashboard.queries() if words in title.lower()]
    assert exprs, f"no panel titled like {words!r}; titles: {sorted({t for t, _ in dashboard.queries()})}"
    using = [e for e in exprs if series in metric_names(e)]
    assert using, f"panel {words!r} does not query {series}: {exprs}"
    if label is not None:
        assert any(re.search(rf"\bby \([^)]*\b{label}\b", e) for e in using), f"{words!r}: nothing by {label}"


def test_every_series_is_known():
    used = {name for _, expr in dashboard.queries() for name in metric_names(expr)}
    assert used - KNOWN == set(), f"unknown series {sorted(used - KNOWN)}; known: contract, Ray Serve, DCGM"
    assert {"ray_diffguard_requests_total", "ray_diffguard_scan_running", "DCGM_FI_DEV_FB_FREE"} <= used


def test_service_series_are_the_ones_deployments_define():
    source = (ROOT / "deployments/metrics.py").read_text()
    for name in SERVICE:
        base = re.sub(r"(_total|_bucket|_sum|_count)$", "", name.removeprefix("ray_"))
        assert f'"{base}"' in source, f"{name}: deployments/metrics.py defines no {base!r}"


def test_metric_names_and_aggregation_checks_can_fail():
    expr = 'sum by (route, le) (rate(a_bucket{x=~"b|c", le!=""}[5m])) / on() group_left() max(c:d) + rate(e_total[1m])'
    assert metric_names(expr) == {"a_bucket", "c:d", "e_total"}
    assert unaggregated(expr) == ["e_total"]
    assert unaggregated("histogram_quantile(0.9, sum by (le) (rate(h_bucket[1m]))) * time()") == []


def test_every_query_sums_rays_per_worker_labels_away():
    bad = [(title, expr) for title, expr in dashboard.queries() if unaggregated(expr)]
    assert bad == [], bad


# --- every query is PromQL Prometheus accepts ---
def _check_rules(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess[str]:
    rules = [{"record": f"dashboard:query_{i}", "expr": dashboard.concrete(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_every_query_is_valid_promql(tmp_path):
    if shutil.which(PROMTOOL) is None:
        pytest.skip(NO_PROMTOOL)
    exprs = [expr for _, expr in dashboard.queries()]
    out = _check_rules(tmp_path, exprs)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout, out.stdout
    broken = _check_rules(tmp_path, ["sum by (route (rate(ray_diffguard_requests_total[$__rate_interval]))"])
    assert broken.returncode != 0, "promtool accepted a broken query"
