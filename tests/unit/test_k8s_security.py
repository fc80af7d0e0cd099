"""The cluster as an operator reads it: Ray's control plane needs the token, every pod is hardened, the service
account token is mounted only where the API is called, and the NetworkPolicies let exactly the intended peers in."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.unit.k8s_support import OVERLAYS, RAY_KINDS, Resource, cluster_spec, one, pod_templates, rendered

APP = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
OPERATOR = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
    "podSelector": {"matchLabels": {APP: "kuberay-operator"}},
}
RAY_PORTS = [6379, 10001, 52365, 8076, 12345]  # GCS, client, dashboard agent, object manager, a worker port


def ray_resources(overlay: str) -> list[Resource]:
    return [r for r in rendered(overlay) if r["kind"] in RAY_KINDS]


# --- Ray's control plane ---
@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_ray_cluster_requires_the_ray_token(overlay):
    for resource in ray_resources(overlay):
        cluster = cluster_spec(resource)
        # KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from this Secret's auth_token) on every Ray container.
        assert cluster["authOptions"] == {"mode": "token", "secretName": "diffguard-ray-token"}, resource["kind"]
        assert "RAY_AUTH_MODE" not in str(resource)  # nothing overrides it per container


# --- pods ---
@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_pod_and_container_is_hardened(overlay):
    for resource in ray_resources(overlay):
        for group, template in pod_templates(resource):
            pod = template["spec"]
            where = f"{overlay}:{resource['kind']}:{group}"
            security = pod["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] >= 10000, where
            assert security["runAsGroup"] == security["fsGroup"] == security["runAsUser"], where
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                ctx = container["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True, where
                assert ctx["capabilities"] == {"drop": ["ALL"]} and not ctx.get("privileged"), where
                # A read-only root filesystem: Ray's session dir (/tmp/ray) and HOME (caches) are emptyDir volumes.
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts["/tmp"] in empty_dirs and mounts["/home/diffguard"] in empty_dirs, where


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_the_service_account_token_is_mounted_only_where_the_api_is_called(overlay):
    for resource in ray_resources(overlay):
        autoscaler = bool(cluster_spec(resource).get("enableInTreeAutoscaling"))
        for group, template in pod_templates(resource):
            mounted = template["spec"].get("automountServiceAccountToken", True)
            # Only the head of an autoscaling cluster: its autoscaler sidecar scales the worker pods via the API.
            assert mounted is (group == "head" and autoscaler), (overlay, resource["kind"], group)


def test_the_autoscaler_sidecar_is_hardened_too():
    (service,) = [r for r in rendered("prod") if r["kind"] == "RayService"]
    assert cluster_spec(service)["autoscalerOptions"]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


# --- NetworkPolicies ---
def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: not used here, so not evaluated
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def port_matches(rule: dict[str, Any], port: int, protocol: str = "TCP") -> bool:
    ports = rule.get("ports")
    return ports is None or any(p.get("protocol", "TCP") == protocol and p.get("port") == port for p in ports)


def policies_for(overlay: str, labels: dict[str, str], direction: str) -> list[Resource]:
    return [
        p
        for p in rendered(overlay)
        if p["kind"] == "NetworkPolicy"
        and selects(p["spec"]["podSelector"], labels)
        and direction in p["spec"]["policyTypes"]
    ]


def ingress_peers(overlay: str, labels: dict[str, str], port: int) -> list[dict[str, Any]]:
    """Every peer an ingress rule lets reach ``port`` of a pod with ``labels`` (policies are additive)."""
    peers = []
    for policy in policies_for(overlay, labels, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            if port_matches(rule, port):
                assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits everyone"
                peers += rule["from"]
    return peers


def canon(peers: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(p, sort_keys=True) for p in peers)


def ray_pod_labels(overlay: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"{r['kind']}:{group}", template["metadata"]["labels"])
        for r in ray_resources(overlay)
        for group, template in pod_templates(r)
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_ports_are_reachable_only_from_the_same_workload_and_the_dashboard_from_the_operator(overlay):
    for where, labels in ray_pod_labels(overlay):
        assert policies_for(overlay, labels, "Ingress") and policies_for(overlay, labels, "Egress"), where
        own = {"podSelector": {"matchLabels": {APP: labels[APP], COMPONENT: labels[COMPONENT]}}}
        for port in RAY_PORTS:
            assert ingress_peers(overlay, labels, port) == [own], (where, port)
        assert canon(ingress_peers(overlay, labels, 8265)) == canon([own, OPERATOR]), where


@pytest.mark.parametrize(
    "overlay, clients",
    [
        # the TLS front's proxies (k8s/overlays/prod/front.yaml: the Gateway diffguard), never the operator: the
        # head is out of the Serve Service (excludeHeadPodFromServeSvc), so KubeRay checks no head proxy on 8000
        ("prod", {"podSelector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "diffguard"}}}),
        ("dev", {"podSelector": {}}),  # the whole namespace (no namespaceSelector: this namespace only)
    ],
)
def test_the_serve_port_is_reachable_from_where_the_overlay_says(overlay, clients):
    for where, labels in ray_pod_labels(overlay):
        own = {"podSelector": {"matchLabels": {APP: labels[APP], COMPONENT: labels[COMPONENT]}}}
        assert canon(ingress_peers(overlay, labels, 8000)) == canon([own, clients]), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_is_the_workload_dns_https_and_the_gcs_store(overlay):
    for where, labels in ray_pod_labels(overlay):
        rules = [rule for p in policies_for(overlay, labels, "Egress") for rule in p["spec"].get("egress", [])]
        own = {"podSelector": {"matchLabels": {APP: labels[APP], COMPONENT: labels[COMPONENT]}}}
        expected = [
            {"to": [own]},
            {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 443}]},
        ]
        if overlay in ("dev", "prod") and labels[COMPONENT] == "endpoint":  # the GCS store, Redis, by address
            cidr = "10.0.32.0/24" if overlay == "prod" else "10.0.0.0/8"  # prod names its Redis's subnet
            expected.append({"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": 6379}]})
        if overlay == "dev/scan":  # MinIO, in the namespace
            expected.append(
                {
                    "to": [{"podSelector": {"matchLabels": {"app": "minio"}}}],
                    "ports": [{"protocol": "TCP", "port": 9000}],
                }
            )
        assert rules == expected, where


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_the_audit_log_writers_reach_s3(overlay):
    """The Ingress replicas on the endpoint's workers write the audit log (audit_dest, s3://) over HTTPS, and get
    their workload identity's credentials from STS (443 too): some egress rule lets their pods out on TCP 443."""
    service = one(overlay, "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["ingress"]["audit_dest"].startswith("s3://")
    for group in cluster_spec(service)["workerGroupSpecs"]:
        labels = group["template"]["metadata"]["labels"]
        rules = [rule for p in policies_for(overlay, labels, "Egress") for rule in p["spec"].get("egress", [])]
        https = [r for r in rules if port_matches(r, 443) and {"ipBlock": {"cidr": "0.0.0.0/0"}} in r.get("to", [])]
        assert https, (overlay, group["groupName"], rules)


def test_the_policy_evaluator_sees_what_a_bad_policy_opens():
    labels = {APP: "diffguard", COMPONENT: "endpoint"}
    policy = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "open"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}}]}]},
    }
    peers = [p for rule in policy["spec"]["ingress"] if port_matches(rule, 6379) for p in rule["from"]]
    assert selects(policy["spec"]["podSelector"], labels) and peers == [{"namespaceSelector": {}}]
    assert not port_matches({"ports": [{"port": 8000}]}, 6379) and port_matches({"ports": [{"port": 8000}]}, 8000)
