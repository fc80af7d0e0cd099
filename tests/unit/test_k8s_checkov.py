"""checkov (the IaC scanner) on every rendered overlay, with the Ray pod templates extracted as the Pods KubeRay makes
of them: every failed check must be in k8s/checkov-skips.yaml with its reason, and every skip there must still be
needed. checkov takes ~20 s to start, so it runs once per session over all overlays (and a negative control)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.k8s_support import K8S, OVERLAYS, RAY_KINDS, as_pods, rendered

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

SKIPS = K8S / "checkov-skips.yaml"
CONTROL = "diffguard-negative-control"  # a Pod every hardening check must fail: proves the run can fail


def checkov_binary() -> str | None:
    """$CHECKOV, else the tool venv `make setup` builds (.venv/checkov), else checkov on PATH."""
    candidates = [os.environ.get("CHECKOV"), str(Path(sys.prefix) / "checkov" / "bin" / "checkov")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("checkov")


SKIP_LIST: list[dict[str, str]] = yaml.safe_load(SKIPS.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    binary = checkov_binary()
    if binary is None:
        pytest.skip("checkov not found: `make setup` installs it into .venv/checkov (k8s/checkov-requirements.txt)")
    root = tmp_path_factory.mktemp("checkov")
    for overlay in OVERLAYS:
        docs = []
        for resource in rendered(overlay):
            docs += as_pods(resource) if resource["kind"] in RAY_KINDS else [resource]
        (root / f"{overlay.replace('/', '-')}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    control = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": CONTROL, "namespace": "control", "labels": {"app": "control"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1", "securityContext": {"privileged": True}}]},
    }
    (root / "control.yaml").write_text(yaml.safe_dump(control))
    out = subprocess.run(
        [binary, "--directory", str(root), "--framework", "kubernetes", "--output", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: some check failed (the control at least)
    (result,) = [r for r in (lambda d: d if isinstance(d, list) else [d])(json.loads(out.stdout))]
    assert result["check_type"] == "kubernetes"
    return result


def failed(report: dict[str, Any], control: bool = False) -> list[dict[str, Any]]:
    return [c for c in report["results"]["failed_checks"] if (CONTROL in c["resource"]) is control]


def skip_for(check: dict[str, Any]) -> dict[str, str] | None:
    for skip in SKIP_LIST:
        if skip["check"] == check["check_id"] and re.search(skip.get("resource", ""), check["resource"]):
            return skip
    return None


def test_checkov_scanned_every_pod_and_found_its_network_policy(report):
    wanted = {
        p["metadata"]["name"] for o in OVERLAYS for r in rendered(o) if r["kind"] in RAY_KINDS for p in as_pods(r)
    }
    scanned = {c["resource"] for c in report["results"]["passed_checks"] + report["results"]["failed_checks"]}
    assert wanted <= {r.split(".", 2)[2] for r in scanned if r.startswith("Pod.")}, scanned
    # CKV2_K8S_6 (a graph check): every pod is selected by a NetworkPolicy of its overlay.
    covered = {
        c["resource"].split(".", 2)[2] for c in report["results"]["passed_checks"] if c["check_id"] == "CKV2_K8S_6"
    }
    assert wanted <= covered, wanted - covered
    passed = [c for c in report["results"]["passed_checks"] if CONTROL not in c["resource"]]
    ids = sorted({c["check_id"] for c in failed(report)})
    print(f"\ncheckov {report['summary']['checkov_version']}: {len(passed)} passed, {len(failed(report))} failed {ids}")


def test_the_negative_control_fails_the_hardening_checks(report):
    ids = {c["check_id"] for c in failed(report, control=True)}
    # privileged, privilege escalation, writable root filesystem, NET_RAW, seccomp, no NetworkPolicy
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_31", "CKV2_K8S_6"} <= ids, ids


def test_every_failed_check_is_a_reasoned_skip(report):
    unexplained = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in failed(report) if not skip_for(c)]
    assert unexplained == [], "fix the manifests, or add a skip with its reason to k8s/checkov-skips.yaml"


def test_every_skip_is_reasoned_and_still_needed(report):
    used = [skip_for(c) for c in failed(report)]
    for skip in SKIP_LIST:
        assert set(skip) <= {"check", "resource", "reason"} and len(skip["reason"]) > 40, skip
        assert any(u is skip for u in used), f"{skip['check']} no longer fails: remove it from {SKIPS.name}"
