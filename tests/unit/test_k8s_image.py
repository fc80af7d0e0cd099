"""The container image and the docs around the manifests: the Dockerfile, the Ray version everywhere, and the
Kubernetes doc page (docs/KUBERNETES.md)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from tests.unit.k8s_support import (
    K8S,
    OVERLAYS,
    ROOT,
    cluster_spec,
    entrypoint_args,
    one,
    pod_templates,
    ray_pin,
    ray_resources,
    rendered,
)


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest of its first line), skipping comments and continuation lines."""
    lines = [line for line in dockerfile().splitlines() if line and not line.startswith(("#", " "))]
    return [(op, rest) for op, rest in (line.split(None, 1) for line in lines)]


def test_ray_version_matches_the_pin_everywhere():
    pin = ray_pin()
    for label, resource in ray_resources():
        assert cluster_spec(resource)["rayVersion"] == pin, label
    assert ("ARG", f"BASE_IMAGE=rayproject/ray:{pin}-py311-gpu") in dockerfile_instructions()
    assert ("FROM", "${BASE_IMAGE}") in dockerfile_instructions()
    for path in [
        ROOT / "Dockerfile",
        ROOT / "README.md",
        ROOT / "docs" / "KUBERNETES.md",
        *K8S.rglob("*.yaml"),
    ]:  # the CPU variant named in comments
        for tag in re.findall(r"rayproject/ray:(\S+)", path.read_text()):
            assert tag.startswith(f"{pin}-py311"), (path, tag)


def test_dockerfile_runs_as_a_user_that_cannot_write_the_code_and_bakes_no_secrets_or_weights():
    instructions = dockerfile_instructions()
    users = [rest for op, rest in instructions if op == "USER"]
    # Built by the image's `ray` (uid 1000); run as 10001:10001, the manifests' runAsUser/runAsGroup.
    assert users[0] == "ray" and users[-1] == "10001:10001", users
    for overlay in OVERLAYS:
        for resource in rendered(overlay):
            if resource["kind"] in ("RayService", "RayJob"):
                for _, template in pod_templates(resource):
                    security = template["spec"]["securityContext"]
                    assert (security["runAsUser"], security["runAsGroup"]) == (10001, 10001), overlay
    text = dockerfile()
    assert "useradd --uid 10001 --gid 10001 --home-dir /home/diffguard" in text
    assert "-perm -o+w -exec chmod o-w" in text  # nobody but the owner (ray) may write code or environment
    assert "assert not os.access(os.path.dirname(pipeline.__file__), os.W_OK)" in text  # and the build checks it
    assert re.search(r"pip install --no-cache-dir \.", text)
    for op, rest in instructions:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(?i)(token|secret|password|passwd|access_key|api_key)", rest), rest
    assert not re.search(r"models download|snapshot_download|model_cache --", text)  # weights: at run time
    torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    assert ("ARG", f"TORCH_VERSION={torch}") in instructions  # the same torch as `make setup`
    assert {".git", ".venv", ".env"} <= set((ROOT / ".dockerignore").read_text().split())
    env = " ".join(rest for op, rest in instructions if op == "ENV") + text
    assert "HOME=/home/diffguard" in env and "HF_HOME=/models/huggingface" in env  # the manifests' mounts


def test_the_init_containers_module_is_in_the_image():
    assert ("COPY", "--chown=1000:100 k8s ./k8s") in dockerfile_instructions()  # python -m k8s.model_cache


# --- docs/KUBERNETES.md ---
def secret_volumes(node: Any) -> Iterator[tuple[str, list[str]]]:
    """(Secret name, keys) of every secret volume."""
    if isinstance(node, dict):
        if "secret" in node and "secretName" in node["secret"]:
            yield node["secret"]["secretName"], [i["key"] for i in node["secret"].get("items", [])]
        for value in node.values():
            yield from secret_volumes(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_volumes(item)


def test_kubernetes_doc_uses_the_names_and_numbers_of_the_manifests():
    doc = (ROOT / "docs" / "KUBERNETES.md").read_text()
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in doc, overlay
        assert f"kubectl kustomize k8s/overlays/{overlay}" in doc or "for o in dev dev/scan prod prod/scan" in doc
    everything = [r for overlay in OVERLAYS for r in rendered(overlay)]
    for name, keys in set((n, tuple(k)) for n, k in secret_volumes(everything)):
        assert f"kubectl create secret generic {name}" in doc, name
        for key in keys:
            assert f"--from-file={key}=" in doc or f"--from-literal={key}=" in doc, (name, key)
    # The Ray token Secret KubeRay reads (authOptions.secretName, key auth_token).
    (secret,) = {
        cluster_spec(r)["authOptions"]["secretName"] for r in everything if r["kind"] in ("RayService", "RayJob")
    }
    assert f"kubectl create secret generic {secret} --from-literal=auth_token=" in doc
    service = one("prod", "RayService")
    assert f"svc/{service['spec']['serveService']['metadata']['name']}" in doc
    for group in cluster_spec(service)["workerGroupSpecs"]:
        bounds = f"`{group['groupName']}`: minReplicas: {group['minReplicas']}, maxReplicas: {group['maxReplicas']}"
        assert bounds in doc, bounds
    # The Secrets KubeRay and the Gateway read, not mounted as volumes: the GCS store's password, the certificate.
    assert "kubectl create secret generic diffguard-redis --from-literal=password=" in doc
    assert "kubectl create secret tls diffguard-tls" in doc
    dev_scan = entrypoint_args(one("dev/scan", "RayJob"))
    assert dev_scan.source in doc and f"diffguard scan-results {dev_scan.output}" in doc
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in doc  # the tested CRDs
    for needed in (
        "checkov",
        "kubernetes-validate",
        "RAY_AUTH_MODE=token",
        "enforces nothing",
        "eks.amazonaws.com/role-arn",
    ):
        assert needed in doc, needed
    assert "iam.gke.io/gcp-service-account" in doc and "@REVISION" in doc
    readme = (ROOT / "README.md").read_text()
    assert "docs/KUBERNETES.md" in readme
