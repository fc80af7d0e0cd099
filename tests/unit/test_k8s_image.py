"""The container image and the docs around the manifests: the Dockerfile, the Ray version everywhere, and the README's
"Deploy on Kubernetes" section."""

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
    for path in [ROOT / "Dockerfile", ROOT / "README.md", *K8S.rglob("*.yaml")]:  # the CPU variant named in comments
        for tag in re.findall(r"rayproject/ray:(\S+)", path.read_text()):
            assert tag.startswith(f"{pin}-py311"), (path, tag)


def test_dockerfile_runs_as_non_root_installs_the_project_and_bakes_no_secrets_or_weights():
    instructions = dockerfile_instructions()
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1] == "ray", users  # the Ray image's non-root user (uid 1000)
    assert re.search(r"pip install --no-cache-dir \.", dockerfile())
    for op, rest in instructions:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(?i)(token|secret|password|passwd|access_key|api_key)", rest), rest
    assert not re.search(r"models download|snapshot_download|model_cache --", dockerfile())  # weights: at run time
    torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    assert ("ARG", f"TORCH_VERSION={torch}") in instructions  # the same torch as `make setup`
    assert {".git", ".venv", ".env"} <= set((ROOT / ".dockerignore").read_text().split())


def test_the_init_containers_module_is_in_the_image():
    assert ("COPY", "--chown=1000:100 k8s ./k8s") in dockerfile_instructions()  # python -m k8s.model_cache


# --- the README's "Deploy on Kubernetes" ---
def secret_refs(node: Any) -> Iterator[tuple[str, str | None]]:
    """(Secret name, key) of every secretKeyRef, and (name, None) of every envFrom secretRef."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        if "secretRef" in node:
            yield node["secretRef"]["name"], None
        for value in node.values():
            yield from secret_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_refs(item)


def test_readme_deploy_section_uses_the_names_and_numbers_of_the_manifests():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploy on Kubernetes") : readme.index("## Development")]
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in section, overlay
    for name, key in set(secret_refs([r for overlay in OVERLAYS for r in rendered(overlay)])):
        assert f"kubectl create secret generic {name}" in section, name
        assert key is None or f"--from-literal={key}=" in section, (name, key)
    service = one("prod", "RayService")
    assert f"svc/{service['spec']['serveService']['metadata']['name']}" in section
    (group,) = cluster_spec(service)["workerGroupSpecs"]
    assert f"minReplicas: {group['minReplicas']}" in section and f"maxReplicas: {group['maxReplicas']}" in section
    dev_scan = entrypoint_args(one("dev/scan", "RayJob"))
    assert dev_scan.source in section and f"diffguard scan-results {dev_scan.output}" in section
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in section  # the tested CRDs
