"""The core Kubernetes resources of every overlay (NetworkPolicy, PersistentVolumeClaim, ServiceAccount, ConfigMap)
and every Ray pod template taken as a Pod validate against Kubernetes' own OpenAPI schemas (the kubernetes-validate
package), strictly: an unknown or misspelt field fails. The Ray resources themselves: test_k8s_crds.py; the
prometheus-operator ones (PodMonitor, PrometheusRule): test_k8s_monitoring.py; the Gateway API ones (Gateway,
HTTPRoute), whose schemas kubernetes-validate lacks: test_k8s_front.py."""

from __future__ import annotations

import pytest

from tests.unit.k8s_support import OVERLAYS, RAY_KINDS, Resource, as_pods, one, rendered

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")

# The oldest Kubernetes minor the manifests promise (KubeRay 1.7's floor is older) and the newest the package knows.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def core_resources(overlay: str) -> list[Resource]:
    """Everything kubectl would send to the API server but the Ray resources, plus the Pods KubeRay makes. The
    prometheus-operator kinds (k8s/monitoring) are not Kubernetes' own: test_k8s_monitoring.py validates them."""
    out = []
    for resource in rendered(overlay):
        if resource["apiVersion"].startswith(("monitoring.coreos.com/", "gateway.networking.k8s.io/")):
            continue
        out += as_pods(resource) if resource["kind"] in RAY_KINDS else [resource]
    return out


def errors(resource: Resource, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{resource['kind']} {resource['metadata']['name']}: {'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_core_resources_and_pod_templates_validate_against_the_kubernetes_schemas(overlay, version):
    resources = core_resources(overlay)
    kinds = {r["kind"] for r in resources}
    assert {"NetworkPolicy", "Pod"} <= kinds, kinds
    if overlay == "prod":
        assert "PodDisruptionBudget" in kinds, kinds
    assert [e for r in resources for e in errors(r, version)] == []


def test_schema_validation_catches_typos_and_wrong_types():
    (policy,) = [r for r in rendered("prod") if r["kind"] == "NetworkPolicy"]
    policy["spec"]["policyType"] = ["Ingress"]  # typo of policyTypes
    (pod, *_) = as_pods(one("prod", "RayService"))
    pod["spec"]["securityContext"]["runAsUser"] = "10001"  # must be an integer
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # the field is ...Filesystem
    assert errors(policy, VERSIONS[-1]) and "policyType" in errors(policy, VERSIONS[-1])[0]
    assert errors(pod, VERSIONS[-1])
    del pod["spec"]["securityContext"]["runAsUser"]
    assert "readOnlyRootFileSystem" in errors(pod, VERSIONS[-1])[0]
