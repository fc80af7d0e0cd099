"""The log-shipping example of docs/KUBERNETES.md ("Logs"): its three files, taken from the doc as written, render
with `kubectl kustomize` on top of k8s/overlays/prod; the RayService still validates against the KubeRay CRDs, its
pods and the ConfigMap against Kubernetes' schemas; and every Ray pod gets a hardened Fluent Bit sidecar reading the
folder its Ray container writes Ray's logs to. Not applied by default: no overlay includes it."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from tests.unit.k8s_support import K8S, KUBECTL, NO_KUBECTL, ROOT, Resource, as_pods, cluster_spec, pod_templates

DOC = ROOT / "docs" / "KUBERNETES.md"
LOG_DIR = "/tmp/ray/session_latest/logs/"


def doc_files() -> dict[str, str]:
    """The fenced blocks of the doc's "## Logs" section that start with `# file: NAME`, by name."""
    text = DOC.read_text()
    section = text[text.index("\n## Logs\n") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = re.findall(r"```\w*\n# file: (\S+)\n(.*?)```", section, flags=re.S)
    return {name: body for name, body in blocks}


@pytest.fixture(scope="module")
def rendered_example(tmp_path_factory) -> list[Resource]:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    files = doc_files()
    assert set(files) == {"kustomization.yaml", "fluent-bit.conf", "fluent-bit-sidecar.yaml"}, sorted(files)
    overlay = tmp_path_factory.mktemp("prod-logs")
    # `../prod` in the doc: the overlay sits beside k8s/overlays/prod; here, wherever pytest's tmp is
    prod = os.path.relpath(K8S / "overlays" / "prod", overlay)
    assert "  - ../prod\n" in files["kustomization.yaml"]
    files["kustomization.yaml"] = files["kustomization.yaml"].replace("  - ../prod\n", f"  - {prod}\n")
    for name, body in files.items():
        (overlay / name).write_text(body)
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_the_example_validates_against_the_kuberay_crds_and_the_kubernetes_schemas(rendered_example):
    from tests.unit.test_k8s_crds import schema_errors

    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    (service,) = [r for r in rendered_example if r["kind"] == "RayService"]
    assert schema_errors(service) == []
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"}}
    assert schema_errors({**cluster, "spec": cluster_spec(service)}) == []
    (config_map,) = [r for r in rendered_example if r["metadata"]["name"] == "diffguard-fluent-bit"]
    for resource in [config_map, *as_pods(service)]:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_every_ray_pod_ships_the_folder_its_ray_container_writes(rendered_example):
    (service,) = [r for r in rendered_example if r["kind"] == "RayService"]
    (config_map,) = [r for r in rendered_example if r["metadata"]["name"] == "diffguard-fluent-bit"]
    config = config_map["data"]["fluent-bit.conf"]
    paths = [p for line in re.findall(r"^\s*Path\s+(\S+)$", config, flags=re.M) for p in line.split(",")]
    assert paths and all(p.startswith(LOG_DIR) for p in paths), paths
    assert f"{LOG_DIR}serve/*.log" in paths  # diffguard's replicas (Serve's replica logs)
    for group, template in pod_templates(service):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        ray, *_, sidecar = pod["containers"]  # KubeRay takes containers/0 as the Ray container
        assert sidecar["name"] == "fluent-bit", group
        ray_mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
        mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
        # The Ray container's /tmp/ray is an explicit emptyDir (on the autoscaling head KubeRay would otherwise add
        # its own ray-logs volume there, which no template can name); the sidecar reads that very volume, read-only.
        assert "emptyDir" in volumes[ray_mounts["/tmp/ray"]], group
        assert mounts["/tmp/ray"]["name"] == ray_mounts["/tmp/ray"] and mounts["/tmp/ray"]["readOnly"] is True, group
        config_dir = mounts["/fluent-bit/etc/diffguard"]
        assert volumes[config_dir["name"]]["configMap"]["name"] == config_map["metadata"]["name"], group
        assert sidecar["args"] == ["-c", "/fluent-bit/etc/diffguard/fluent-bit.conf"], group
        security = sidecar["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True, group
        assert security["capabilities"] == {"drop": ["ALL"]} and pod["securityContext"]["runAsNonRoot"] is True
        assert sidecar["resources"]["limits"]["memory"], group
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
        assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}, group
        assert all(f"${{{name}}}" in config for name in env), group


def test_the_example_is_not_applied_by_default():
    for overlay in ("prod", "prod/scan", "dev", "dev/scan"):
        assert "fluent-bit" not in (K8S / "overlays" / overlay / "kustomization.yaml").read_text(), overlay
    assert not any((K8S / "overlays").rglob("fluent-bit*")), "the example lives in the doc only"
