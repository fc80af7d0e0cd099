"""The alerting rules (k8s/monitoring/alerts.yaml, written as a plain rule file by k8s.rules) against a real
``promtool``: ``check rules``, and ``test rules`` on every case in tests/promtool/; plus what every alert must carry
(a firing and a quiet case, a runbook section in docs/OPERATIONS.md, only series that exist).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s import rules

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = Path("/usr/bin/promtool")
CASES = sorted((ROOT / "tests" / "promtool").glob("*.yaml"))
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
RULE_FILE = "diffguard-rules.yaml"  # what every tests/promtool/*.yaml names in rule_files

# The series the rules may read: the metric contract's (issue 29: deployments/metrics.py, the scan's progress) and
# Ray Serve's own as a live `diffguard serve` on Ray 2.60 exports them. A stand-in for the live check that scrapes
# a real serve and scan, which can replace it.
CONTRACT_SERIES = frozenset(
    {
        "ray_diffguard_requests_total",
        *(f"ray_diffguard_moderation_latency_s_{s}" for s in ("bucket", "count", "sum")),
        "ray_diffguard_images_scored_total",
        "ray_diffguard_images_flagged_total",
        *(f"ray_diffguard_checker_batch_size_{s}" for s in ("bucket", "count", "sum")),
        "ray_diffguard_images_generated_total",
        *(f"ray_diffguard_generator_batch_{h}_{s}" for h in ("images", "requests") for s in ("bucket", "count", "sum")),
        "ray_diffguard_keys_reload_failures_total",
        "ray_diffguard_audit_failures_total",
        "ray_diffguard_quota_unavailable_total",
        "ray_diffguard_image_actions_total",
        "ray_diffguard_images_unscorable_total",
        "ray_diffguard_generator_queue_images",
        "ray_diffguard_generator_inflight_images",
        *(
            f"ray_diffguard_scan_{name}"
            for name in (
                "objects_listed_total",
                "objects_read_total",
                "objects_scored_total",
                "objects_flagged_total",
                "errors_total",
                "bytes_read_total",
                "quarantine_failures_total",
                "running",
                "last_progress_timestamp_seconds",
            )
        ),
    }
)
SERVE_SERIES = frozenset(
    {
        "ray_serve_deployment_replica_healthy",
        "ray_serve_deployment_status",
        "ray_serve_deployment_queued_queries",
        "ray_serve_replica_processing_queries",
        "ray_serve_num_http_requests_total",
        "ray_serve_num_http_error_requests_total",
        "ray_serve_deployment_request_counter_total",
    }
)
KNOWN_SERIES = CONTRACT_SERIES | SERVE_SERIES


@pytest.fixture(scope="module")
def promtool() -> str:
    if not PROMTOOL.exists():
        pytest.skip(f"no promtool at {PROMTOOL} (apt-get install prometheus; .ci/run installs it)")
    return str(PROMTOOL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rule file as ``python -m k8s.rules`` writes it, beside a copy of every promtool test file."""
    out = tmp_path_factory.mktemp("promtool")
    run = subprocess.run([sys.executable, "-m", "k8s.rules"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (out / RULE_FILE).write_text(run.stdout)
    for case in CASES:
        shutil.copy(case, out / case.name)
    return out


def test_python_m_k8s_rules_writes_the_prometheus_rule_groups(workdir):
    text = (workdir / RULE_FILE).read_text()
    assert text.startswith(rules.HEADER)
    assert yaml.safe_load(text) == {"groups": rules.groups()}
    usage = subprocess.run([sys.executable, "-m", "k8s.rules", "x"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: python -m k8s.rules" in usage.stderr


def test_rule_file_passes_promtool_check_rules(promtool, workdir):
    out = subprocess.run([promtool, "check", "rules", RULE_FILE], cwd=workdir, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules.rules())} rules found" in out.stdout


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_promtool_unit_tests_pass(promtool, workdir, case):
    assert yaml.safe_load((workdir / case).read_text())["rule_files"] == [RULE_FILE]
    out = subprocess.run([promtool, "test", "rules", case], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_promtool_case():
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in CASES:
        for test in yaml.safe_load(case.read_text())["tests"]:
            for check in test.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(rules.alerts())
    assert names - firing == set(), "alerts without a case where they fire"
    assert names - quiet == set(), "alerts without a case where they must not fire"
    assert (firing | quiet) - names == set(), "promtool cases for alerts that do not exist"


def test_every_alert_is_named_labelled_and_annotated():
    for name, rule in rules.alerts().items():
        assert re.fullmatch(r"Diffguard[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name
        assert all(str(text).strip() for text in rule["annotations"].values()), name


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_alert_has_a_runbook_section_and_a_row_in_the_table():
    text = OPERATIONS.read_text()
    anchors = _anchors(text)
    for name, rule in rules.alerts().items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/OPERATIONS.md#{name.lower()}", (name, url)
        assert name.lower() in anchors, f"docs/OPERATIONS.md has no section for {name}"
        assert f"| [{name}](#{name.lower()}) |" in text, f"docs/OPERATIONS.md's alert table has no row for {name}"


def test_every_series_the_rules_read_is_exported():
    unknown = rules.series() - KNOWN_SERIES
    assert unknown == set(), f"series no contract lists and Ray Serve does not export: {sorted(unknown)}"


def test_metric_names_finds_series_not_functions_labels_or_keywords():
    expr = (
        'sum by (route, le) (rate(a_total{status!~"4..", x="b_total"}[5m] offset 1h)) / on (dest) group_left ()'
        ' max(c) > bool 0 and time() - d:rec < 900 or label_replace(e, "queue", "f", "", "")'
    )
    assert rules.metric_names(expr) == {"a_total", "c", "d:rec", "e"}
    assert rules.series() >= {"ray_diffguard_requests_total", "ray_diffguard_scan_running"}
    assert not rules.series() & rules.recorded()


def test_latency_threshold_is_half_the_checker_timeout():
    config = yaml.safe_load((ROOT / "deployments" / "configs" / "production.yaml").read_text())
    (app,) = [a for a in config["applications"] if a["name"] == "diffguard"]
    timeout = float(app["args"]["ingress"]["checker_timeout_s"])
    rule = rules.alerts()["DiffguardCheckerLatencyHigh"]
    (threshold,) = re.findall(r"histogram_quantile\(0\.99,.*\)\s*>\s*([\d.]+)", rule["expr"])
    assert float(threshold) == timeout / 2, (threshold, timeout)
    assert f"threshold {float(threshold):g} s, half of checker_timeout_s" in rule["annotations"]["description"]


def test_checker_unavailable_is_plain_for_the_live_test():
    """The live test shortens this rule's windows and ``for`` by replacing their duration strings: they must all
    be one literal, with no recorded series (which would keep their own windows) and no offset."""
    rule = rules.alerts()["DiffguardCheckerUnavailable"]
    assert set(re.findall(r"\[([^\]]+)\]", rule["expr"])) == {"5m"}
    assert rule["for"] == "5m"
    assert not rules.metric_names(rule["expr"]) & rules.recorded()
    assert "offset" not in rule["expr"]


def test_load_refuses_what_is_not_a_prometheus_rule(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="kind is 'ConfigMap'; expected 'PrometheusRule'"):
        rules.load(path)
    path.write_text("kind: PrometheusRule\nspec:\n  groups:\n    - name: g\n      rules: [{alert: A, record: b}]\n")
    with pytest.raises(ValueError, match="both or neither of alert, record"):
        rules.load(path)
