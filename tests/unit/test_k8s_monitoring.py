"""The monitoring component (k8s/monitoring, in the prod overlays): its prometheus-operator objects validate against
the operator's schemas (@kubernetes-models/prometheus-operator, through k8s/tools/validate-monitoring.mjs), the
PodMonitors select the pods KubeRay makes of the RayService and the RayJob (labelled as KubeRay labels them) on ports
their Ray containers name, the NetworkPolicies admit the monitoring namespace to exactly the metrics ports, and the
dashboard ConfigMap carries the Grafana sidecar's label and the dashboard JSON. The component's objects are
prometheus-operator kinds: kubernetes-validate (test_k8s_schemas.py) cannot know them, the KubeRay CRDs
(test_k8s_crds.py) do not cover them; checkov (test_k8s_checkov.py) scans them with the rest."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.unit.k8s_support import K8S, OVERLAYS, Resource, one, pod_templates, rendered
from tests.unit.test_k8s_security import ingress_peers, policies_for

NODE = shutil.which("node")
TOOLS = K8S / "tools"
VALIDATOR = TOOLS / "validate-monitoring.mjs"
INSTALL = "npm ci --prefix k8s/tools"
GROUP = "monitoring.coreos.com"
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
# port name -> number: Ray's metrics agent (metrics-export-port, KubeRay's default) and Serve's HAProxy exporter
# (RAY_SERVE_HAPROXY_METRICS_PORT's default)
METRICS_PORTS = {"metrics": 8080, "haproxy-metrics": 9101}
# every port a Ray pod of either workload listens on besides the metrics ports: none may admit the monitoring namespace
OTHER_PORTS = [6379, 8265, 10001, 8000, 8404, 52365, 8076, 12345, 30000]
# What each PodMonitor scrapes: (workload component, port name).
MONITORS = {
    "diffguard-ray": ("endpoint", "metrics"),
    "diffguard-haproxy": ("endpoint", "haproxy-metrics"),
    "diffguard-scan": ("scan", "metrics"),
}
# The fields the PodMonitors here use. The package's schemas check types, enums and patterns but let unknown fields
# through (the API server would prune them silently), so a misspelt field would be ignored: these are pinned instead.
SPEC_FIELDS = {"selector", "podMetricsEndpoints"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "relabelings"}


def monitoring_objects(overlay: str) -> list[Resource]:
    return [copy.deepcopy(r) for r in rendered(overlay) if r["apiVersion"].startswith(f"{GROUP}/")]


def validate(objects: list[Resource]) -> tuple[int, list[str]]:
    """(exit status, one line per object) of the node validator: `ok KIND/NAME` or `invalid KIND/NAME: ...`."""
    if NODE is None:
        pytest.skip(f"node is not on PATH: the prometheus-operator schemas are validated with Node.js ({INSTALL})")
    if not (TOOLS / "node_modules" / "@kubernetes-models" / "prometheus-operator").is_dir():
        pytest.skip(f"the prometheus-operator schema package is not installed: run `{INSTALL}`")
    out = subprocess.run(
        [NODE, str(VALIDATOR)], input=json.dumps(objects), capture_output=True, text=True, timeout=120, cwd=TOOLS
    )
    assert out.returncode in (0, 1), f"validator failed: {out.stderr}"
    return out.returncode, out.stdout.splitlines()


# --- what renders where ---
def test_prod_renders_the_component_and_only_prod_does():
    kinds = sorted((r["kind"], r["metadata"]["name"]) for r in monitoring_objects("prod"))
    monitors = [name for kind, name in kinds if kind == "PodMonitor"]
    assert sorted(monitors) == sorted(MONITORS) and ("PrometheusRule", "diffguard") in kinds, kinds
    for overlay in ("base", "dev", "dev/scan", "prod/scan"):  # prod/scan gets only its NetworkPolicy rule
        assert monitoring_objects(overlay) == [], overlay
        assert not [r for r in rendered(overlay) if r["kind"] == "ConfigMap"], overlay


def test_every_monitoring_object_validates_against_the_prometheus_operator_schemas():
    objects = monitoring_objects("prod")
    status, lines = validate(objects)
    assert status == 0 and lines == [f"ok {r['kind']}/{r['metadata']['name']}" for r in objects], lines


def test_the_validator_refuses_wrong_types_enums_and_kinds():
    (monitor, *_) = [r for r in monitoring_objects("prod") if r["kind"] == "PodMonitor"]
    (rule,) = [r for r in monitoring_objects("prod") if r["kind"] == "PrometheusRule"]
    wrong_type = copy.deepcopy(monitor)
    wrong_type["spec"]["podMetricsEndpoints"][0]["interval"] = 15  # a Duration is a string: "15s"
    bad_action = copy.deepcopy(monitor)
    bad_action["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    bad_duration = copy.deepcopy(rule)
    bad_duration["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    unknown_kind = {**copy.deepcopy(monitor), "kind": "PodMonitr"}
    status, lines = validate([monitor, wrong_type, bad_action, bad_duration, unknown_kind])
    assert status == 1 and lines[0].startswith("ok "), lines
    assert "/spec/podMetricsEndpoints/0/interval: must be string" in lines[1], lines
    assert "/spec/podMetricsEndpoints/0/relabelings/0/action" in lines[2] and "keep" in lines[2], lines
    assert lines[3].startswith("invalid PrometheusRule/") and "/rules/0/for: must match pattern" in lines[3], lines
    assert '"PodMonitr" is not a monitoring.coreos.com/v1 kind' in lines[4], lines


def test_podmonitors_set_only_the_fields_pinned_here_and_sane_intervals():
    for monitor in monitoring_objects("prod"):
        if monitor["kind"] != "PodMonitor":
            continue
        name = monitor["metadata"]["name"]
        assert set(monitor["spec"]) <= SPEC_FIELDS, (name, set(monitor["spec"]) - SPEC_FIELDS)
        assert "namespaceSelector" not in monitor["spec"]  # the pods in the PodMonitor's own namespace
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert set(endpoint) <= ENDPOINT_FIELDS, (name, set(endpoint) - ENDPOINT_FIELDS)
            # Ray's agent refreshes its series about every 10 s: 15 s to 60 s, and a timeout below the interval
            assert 15 <= seconds(endpoint["interval"]) <= 60, (name, endpoint["interval"])
            assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"]), name


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, f"{duration!r}: a whole number of minutes and seconds, e.g. 15s or 1m"
    return int(match[1] or 0) * 60 + int(match[2] or 0)


# --- PodMonitors against the pods KubeRay makes ---
def kuberay_pods(resource: Resource) -> list[tuple[str, dict[str, str], Resource]]:
    """(group, labels, pod spec) of every pod KubeRay v1.7 makes of a RayService or RayJob. Ray pods: KubeRay's own
    labels, overridden by the template's, except ray.io/node-type, ray.io/group and ray.io/cluster, which KubeRay
    always sets (the cluster is <name>-<random suffix>). A RayJob's submitter is a Job's pod: the template's labels
    and the Job controller's, none of Ray's."""
    name = resource["metadata"]["name"]
    out = []
    for group, template in pod_templates(resource):
        labels = dict(template["metadata"].get("labels", {}))
        if group == "submitter":
            labels |= {"batch.kubernetes.io/job-name": name, "job-name": name}
        else:
            kuberay = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay"}
            kuberay |= {"app.kubernetes.io/created-by": "kuberay-operator"}
            ray = {"ray.io/node-type": "head" if group == "head" else "worker", "ray.io/cluster": f"{name}-x7k2p"}
            labels = kuberay | labels | ray | {"ray.io/group": "headgroup" if group == "head" else group}
        out.append((group, labels, template["spec"]))
    return out


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) applied to a pod's labels."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def workload_pods() -> list[tuple[str, dict[str, str], Resource]]:
    """(workload:group, labels, pod spec) of every pod the prod endpoint and a prod scan run, in one namespace."""
    pods = [(f"endpoint:{g}", labels, spec) for g, labels, spec in kuberay_pods(one("prod", "RayService"))]
    return pods + [(f"scan:{g}", labels, spec) for g, labels, spec in kuberay_pods(one("prod/scan", "RayJob"))]


def named_port(pod: Resource, name: str) -> int | None:
    ray = pod["containers"][0]  # the Ray container: KubeRay's first
    return next((p["containerPort"] for p in ray.get("ports", []) if p.get("name") == name), None)


def test_podmonitors_select_the_ray_pods_of_their_workload_on_named_ports():
    monitors = [r for r in monitoring_objects("prod") if r["kind"] == "PodMonitor"]
    for monitor in monitors:
        name = monitor["metadata"]["name"]
        component, port = MONITORS[name]
        selected = [where for where, labels, _ in workload_pods() if selects(monitor["spec"]["selector"], labels)]
        # head and every worker group of its workload; never the other workload, never the submitter
        expected = [where for where, _, _ in workload_pods() if where.startswith(f"{component}:")]
        assert selected == [w for w in expected if w != "scan:submitter"] and len(selected) >= 2, (name, selected)
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == [port], name
        for where, _, pod in workload_pods():
            if where in selected:
                assert named_port(pod, port) == METRICS_PORTS[port], (name, where, pod["containers"][0].get("ports"))


def test_the_selector_evaluator_can_fail():
    (_, labels, _), *_ = kuberay_pods(one("prod", "RayService"))
    assert selects({"matchLabels": {"app.kubernetes.io/name": "diffguard"}}, labels)
    assert not selects(
        {"matchExpressions": [{"key": "ray.io/node-type", "operator": "In", "values": ["Head"]}]}, labels
    )
    assert not selects({"matchLabels": {"app.kubernetes.io/component": "scan"}}, labels)
    assert labels["ray.io/node-type"] == "head" and labels["app.kubernetes.io/name"] == "diffguard"  # template wins


def test_haproxy_metrics_are_named_exactly_where_haproxy_runs():
    for where, _, pod in workload_pods():
        if where == "scan:submitter":
            continue
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
        haproxy = env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"  # Serve runs HAProxy on every node of the endpoint
        assert (named_port(pod, "haproxy-metrics") == 9101) is haproxy, where
        assert named_port(pod, "metrics") == 8080, where  # every Ray node runs a metrics agent


def test_relabelings_keep_pod_namespace_cluster_and_node_type():
    wanted = {
        "namespace": "__meta_kubernetes_namespace",
        "pod": "__meta_kubernetes_pod_name",
        "ray_io_cluster": "__meta_kubernetes_pod_label_ray_io_cluster",
        "ray_io_node_type": "__meta_kubernetes_pod_label_ray_io_node_type",
    }
    for monitor in monitoring_objects("prod"):
        if monitor["kind"] != "PodMonitor":
            continue
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            rules = {r["targetLabel"]: r for r in endpoint["relabelings"]}
            for target, source in wanted.items():
                assert rules[target]["sourceLabels"] == [source], (monitor["metadata"]["name"], target)
                assert rules[target].get("action", "replace") == "replace"
            # job is the PodMonitor's name whatever the namespace: alerts and panels can name it
            assert rules["job"]["replacement"] == monitor["metadata"]["name"] and "sourceLabels" not in rules["job"]


def test_prometheus_operator_selects_the_monitors_and_the_rules_by_one_release_label():
    releases = {r["metadata"]["labels"].get("release") for r in monitoring_objects("prod")}
    assert releases == {"kube-prometheus-stack"}, releases  # docs/KUBERNETES.md: podMonitorSelector, ruleSelector


# --- NetworkPolicies ---
def monitoring_ports(overlay: str, labels: dict[str, str]) -> set[int]:
    """Every port an ingress rule admits the monitoring namespace to, on a pod with ``labels``."""
    ports: set[int] = set()
    for policy in policies_for(overlay, labels, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            if MONITORING in rule.get("from", []):
                assert rule.get("ports"), f"{policy['metadata']['name']}: the monitoring namespace on every port"
                ports |= {p["port"] for p in rule["ports"] if p.get("protocol", "TCP") == "TCP"}
    return ports


@pytest.mark.parametrize(
    "overlay, ports", [("prod", {8080, 9101}), ("prod/scan", {8080}), ("dev", set()), ("dev/scan", set())]
)
def test_the_monitoring_namespace_reaches_exactly_the_metrics_ports(overlay, ports):
    resource = next(r for r in rendered(overlay) if r["kind"] in ("RayService", "RayJob"))
    for group, labels, _ in kuberay_pods(resource):
        assert monitoring_ports(overlay, labels) == ports, (overlay, group)
        for port in OTHER_PORTS:
            assert MONITORING not in ingress_peers(overlay, labels, port), (overlay, group, port)
        for port in ports:
            assert MONITORING in ingress_peers(overlay, labels, port), (overlay, group, port)


# --- the Grafana dashboard ---
def test_the_dashboard_configmap_carries_the_sidecar_label_and_the_json():
    (config_map,) = [r for r in rendered("prod") if r["kind"] == "ConfigMap"]
    metadata = config_map["metadata"]
    assert metadata["name"] == "diffguard-dashboard"  # no hash suffix: one object, replaced on change
    assert metadata["labels"]["grafana_dashboard"] == "1"  # the Grafana Helm chart's sidecar label (a string)
    assert metadata["annotations"]["grafana_folder"] == "diffguard"  # sidecar.dashboards.folderAnnotation
    (key,) = config_map["data"]
    dashboard = json.loads(config_map["data"][key])
    assert key.endswith(".json") and dashboard == json.loads((K8S / "monitoring" / "dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"], sorted(dashboard)
    # kubectl apply (client side) keeps the whole object in an annotation, which the API server caps at 256 KiB
    assert len(json.dumps(config_map)) < 256 * 1024 - 4096, len(json.dumps(config_map))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_prod_overlays_include_the_component(overlay):
    components = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text()).get("components")
    assert components == {"prod": ["../../monitoring"], "prod/scan": ["../../../monitoring/scan"]}.get(overlay)
