"""Secrets in the KubeRay manifests: no value in any manifest, files rather than environment variables (but for
what KubeRay itself injects: RAY_AUTH_TOKEN and the GCS store's Redis password), the keys file a Secret folder on
every pod with Ingress replicas, the audit bucket written as the workers' workload identity, scans with no key but
their ServiceAccount's (dev: MinIO's credentials file). Rendered with `kubectl kustomize`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest

from tests.unit.k8s_support import (
    K8S,
    OVERLAYS,
    RAY_KINDS,
    ROOT,
    Resource,
    cluster_spec,
    containers,
    one,
    pod_specs,
    rendered,
    serve_app,
)

SECRET_ENV = {"DIFFGUARD_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}


def env_entries(node: Any) -> Iterator[Resource]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_entries(item)


def test_no_manifest_holds_a_secret_value_nor_a_secret_in_the_environment():
    everything = [r for overlay in ["base", *OVERLAYS] for r in rendered(overlay)]
    assert not [r for r in everything if r["kind"] == "Secret"]
    # Secrets are files, but for the GCS store's Redis password, which KubeRay reads from a Secret and passes to the
    # head as an environment variable (as it does RAY_AUTH_TOKEN): no other secretKeyRef anywhere.
    assert "secretRef" not in str(everything)
    refs = [
        cluster_spec(r)["gcsFaultToleranceOptions"]["redisPassword"]
        for r in everything
        if r["kind"] == "RayService" and "gcsFaultToleranceOptions" in cluster_spec(r)
    ]
    assert refs and all(
        r == {"valueFrom": {"secretKeyRef": {"name": "diffguard-redis", "key": "password"}}} for r in refs
    )
    assert str(everything).count("secretKeyRef") == len(refs)
    for entry in env_entries(everything):
        assert entry["name"] not in SECRET_ENV and entry["name"] != "RAY_AUTH_TOKEN", entry
        assert not re.search(r"(?i)secret|password|token$|_key$", entry["name"]), entry
    for path in [*K8S.rglob("*.yaml"), ROOT / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        assert not re.search(r"(?i)(secret_access_key|api_key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", text), path


def secret_mount(container: Resource, path: str) -> Resource:
    """The one volume mount of ``container`` that holds ``path``."""
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    return mount


def secret_file(container: Resource, pod: Resource, path: str) -> tuple[str, str, bool]:
    """(Secret name, key, optional) of the Secret volume item that ``path`` in ``container`` is."""
    mount = secret_mount(container, path)
    assert mount.get("readOnly") is True, mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == relative]
    return volume["secret"]["secretName"], item["key"], volume["secret"].get("optional", False)


KEY_ENVS = {"DIFFGUARD_KEYS_FILE", "DIFFGUARD_API_KEY", "DIFFGUARD_API_KEY_FILE"}


def ingress_pods(service: Resource) -> list[tuple[str, Resource]]:
    """The pods an Ingress replica can land on: every pod whose Ray node offers CPUs (the head offers none)."""
    (ingress,) = [d for d in serve_app(service)["deployments"] if d["name"] == "Ingress"]
    assert Fraction(str(ingress["ray_actor_options"]["num_cpus"])) > 0  # so a node with num-cpus 0 never holds one
    cluster = cluster_spec(service)
    groups = [("head", cluster["headGroupSpec"]), *((g["groupName"], g) for g in cluster["workerGroupSpecs"])]
    return [(name, g["template"]["spec"]) for name, g in groups if g["rayStartParams"].get("num-cpus") != "0"]


@pytest.mark.parametrize("overlay", ["base", "dev", "prod"])
def test_the_keys_file_is_a_secret_folder_on_every_pod_with_ingress_replicas(overlay):
    """DIFFGUARD_KEYS_FILE is re-read every second: its Secret is a volume mounted as a folder (a subPath mount is
    never updated by the kubelet), and the file is the Secret's keys.yaml inside that folder."""
    service = one(overlay, "RayService")
    pods = ingress_pods(service)
    assert [name for name, _ in pods] == [g["groupName"] for g in cluster_spec(service)["workerGroupSpecs"]]
    for name, pod in pods:
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        path = env["DIFFGUARD_KEYS_FILE"]
        mount = secret_mount(container, path)
        assert "subPath" not in mount and "subPathExpr" not in mount, name
        assert mount["mountPath"] == "/var/run/secrets/diffguard/keys" and path == mount["mountPath"] + "/keys.yaml"
        assert secret_file(container, pod, path) == ("diffguard-keys", "keys.yaml", False), name  # no keys, no pod


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_no_container_sets_both_the_keys_file_and_a_single_key(overlay):
    """The Ingress refuses to start with DIFFGUARD_KEYS_FILE beside DIFFGUARD_API_KEY(_FILE); and the old single-key
    Secret is gone from every pod."""
    for resource in rendered(overlay):
        if resource["kind"] not in RAY_KINDS:
            continue
        for container in containers(resource):
            names = {e["name"] for e in container.get("env", [])} & KEY_ENVS
            assert len(names) <= 1 and names <= {"DIFFGUARD_KEYS_FILE"}, (overlay, container["name"], names)
        assert "diffguard-api-key" not in str(resource), overlay


def check_identity(overlay: str, name: str, bound: bool) -> None:
    """The ServiceAccount ``name`` mounts no API token; ``bound``: it carries the workload identity placeholders (EKS
    IRSA and GKE)."""
    (account,) = [r for r in rendered(overlay) if r["kind"] == "ServiceAccount" and r["metadata"]["name"] == name]
    assert account["automountServiceAccountToken"] is False
    if bound:
        annotations = account["metadata"]["annotations"]
        assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_the_audit_log_is_a_bucket_written_as_the_workers_workload_identity(overlay):
    service = one(overlay, "RayService")
    ingress = serve_app(service)["args"]["ingress"]
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S*", ingress["audit_dest"]), ingress
    assert ingress.get("audit_required", True) is True  # no decision leaves without its row
    # The replicas that write it: every pod an Ingress can land on runs as the endpoint's workload identity.
    for name, pod in ingress_pods(service):
        assert pod["serviceAccountName"] == "diffguard-endpoint", name
        assert "AWS_" not in str(pod), name  # no key: the identity's own credentials
    check_identity(overlay, "diffguard-endpoint", bound=overlay == "prod")


def test_dev_has_no_audit_bucket_and_no_cloud_identity():
    service = one("dev", "RayService")
    assert serve_app(service)["args"]["ingress"].get("audit_dest") is None  # local.yaml: nothing to write to
    (account,) = [r for r in rendered("dev") if r["kind"] == "ServiceAccount"]
    assert account["metadata"]["name"] == "diffguard-endpoint" and "annotations" not in account["metadata"]


@pytest.mark.parametrize("overlay", ["base", "prod", "prod/scan"])
def test_hub_token_is_an_optional_file_for_the_init_containers_only(overlay):
    for resource in rendered(overlay):
        if resource["kind"] not in RAY_KINDS:
            continue
        for _, pod in pod_specs(resource):
            for container in pod.get("initContainers", []):
                env = {e["name"]: e["value"] for e in container["env"]}
                # huggingface_hub reads its token from HF_TOKEN_PATH (a missing file: anonymous downloads)
                assert secret_file(container, pod, env["HF_TOKEN_PATH"]) == ("diffguard-hf", "token", True)
            assert "HF_TOKEN_PATH" not in str(pod["containers"])  # the replicas read the cache, never the Hub


@pytest.mark.parametrize("overlay", ["base", "prod/scan"])
def test_prod_scan_needs_no_credentials_but_its_service_account(overlay):
    job = one(overlay, "RayJob")
    text = str(job)
    assert "AWS_" not in text and "diffguard-s3" not in text
    for name, pod in pod_specs(job):
        assert pod["serviceAccountName"] == "diffguard-scan", name
    check_identity(overlay, "diffguard-scan", bound=overlay == "prod/scan")


def test_dev_scan_reads_minio_keys_from_a_credentials_file():
    for name, pod in pod_specs(one("dev/scan", "RayJob")):
        container = pod["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert secret_file(container, pod, env["AWS_SHARED_CREDENTIALS_FILE"]) == ("diffguard-s3", "credentials", False)
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
