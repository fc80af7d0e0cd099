"""One number sizes every drain (k8s/grace.py): the longest request, generator_timeout_s + checker_timeout_s. Serve's
graceful_shutdown_timeout_s per deployment, the workers' preStop deadline and terminationGracePeriodSeconds, the old
cluster's deletion delay after an upgrade and the TLS front's timeout all follow from it, in the repository
(python -m k8s.sync --check) and in every rendered overlay."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from k8s import grace
from tests.unit.k8s_support import ROOT, one, rendered, serve_app


def test_the_numbers_follow_from_the_two_timeouts():
    g = grace.Grace(generator_timeout_s=300, checker_timeout_s=30)
    assert g.longest_request_s == 330
    assert g.graceful_shutdown_s == {"Ingress": 330, "Generator": 300, "SafetyChecker": 30}
    assert (g.prestop_deadline_s, g.termination_grace_period_s) == (330, 330 + grace.PRESTOP_MARGIN_S)
    assert g.termination_grace_period_s - grace.PRESTOP_MARGIN_S == g.prestop_deadline_s  # the contract's margin
    assert g.cluster_deletion_delay_s >= g.longest_request_s and g.front_timeout_s > g.longest_request_s
    assert g.prestop_command == ["python", "-m", "k8s.prestop", "--deadline-s", "330"]
    doubled = grace.Grace(generator_timeout_s=600, checker_timeout_s=60)
    assert doubled.termination_grace_period_s == 660 + grace.PRESTOP_MARGIN_S  # derived, not copied


def test_a_timeout_that_is_not_a_whole_positive_number_is_refused():
    config = yaml.safe_load((ROOT / grace.PRODUCTION).read_text())
    config["applications"][0]["args"]["ingress"]["generator_timeout_s"] = 0
    with pytest.raises(ValueError, match=r"generator_timeout_s must be .* got 0"):
        grace.from_serve_config(config)


def test_the_repository_holds_the_derived_numbers():
    assert grace.problems() == []
    out = subprocess.run([sys.executable, "-m", "k8s.sync", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_wrong_number_is_named():
    config = yaml.safe_load((ROOT / grace.PRODUCTION).read_text())
    g = grace.from_serve_config(config)
    config["applications"][0]["deployments"][0]["graceful_shutdown_timeout_s"] = 20  # Serve's default
    assert grace.serve_problems(config, g, "x") == ["x: Ingress graceful_shutdown_timeout_s is 20, derived 330"]
    service = one("prod", "RayService")
    wrong = copy.deepcopy(service)
    wrong["spec"]["rayClusterDeletionDelaySeconds"] = 60  # KubeRay's default
    pod = wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 30
    del pod["containers"][0]["lifecycle"]
    problems = grace.service_problems(wrong, g, "x")
    assert len(problems) == 3 and "rayClusterDeletionDelaySeconds is 60" in problems[0], problems
    assert "checking terminationGracePeriodSeconds is 30" in problems[1] and "checking preStop is None" in problems[2]


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_the_rendered_endpoint_holds_the_derived_numbers(overlay):
    service = one(overlay, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    g = grace.from_serve_config(config)
    assert (g.generator_timeout_s, g.checker_timeout_s) == (300, 30)
    assert grace.serve_problems(config, g, overlay) == []
    assert grace.service_problems(service, g, overlay) == []
    assert {d["name"] for d in serve_app(service)["deployments"]} == set(g.graceful_shutdown_s)
    if overlay == "prod":
        assert grace.front_problems(list(rendered(overlay)), g, overlay) == []
        assert [r for r in rendered(overlay) if r["kind"] == "HTTPRoute"]


@pytest.mark.parametrize("overlay", ["base", "prod", "dev"])
def test_every_endpoint_worker_drains_its_ray_node_before_it_stops(overlay):
    """The preStop runs on every worker container (the dev one too: its timeouts are production's), with the
    derived deadline; the head has none (its loss is the GCS store's business)."""
    service = one(overlay, "RayService")
    g = grace.from_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == g.prestop_command, group["groupName"]
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] == g.termination_grace_period_s
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "lifecycle" not in head


def test_the_prestop_command_is_one_the_prestop_module_accepts():
    """The manifests' preStop through k8s.prestop's own parser: a renamed flag fails here, not in a drain."""
    prestop = pytest.importorskip("k8s.prestop", reason="k8s/prestop.py (the preStop hook) is not in this checkout")
    command = grace.production().prestop_command
    assert command[:3] == ["python", "-m", "k8s.prestop"]
    assert prestop.parse_args(command[3:]).deadline_s == grace.production().prestop_deadline_s
