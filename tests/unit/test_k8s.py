"""KubeRay manifests: every overlay renders what it should, the Serve configs are the deployments' configs, worker
pods match Serve's autoscaling, GPUs, dev and scans are wired right, hub models are pinned, and no secret value is in
a manifest. Rendered with `kubectl kustomize` (skipped, saying so, where kubectl is absent).

Also: test_k8s_crds.py (the KubeRay CRDs), test_k8s_schemas.py (core schemas), test_k8s_security.py (Ray token auth,
pod hardening, NetworkPolicies, workload identity), test_k8s_checkov.py, test_k8s_image.py (Dockerfile, Ray pin,
docs), test_k8s_tools.py."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
import yaml

from k8s import model_cache, sync
from pipeline import models
from tests.unit.k8s_support import (
    GPU,
    K8S,
    OVERLAYS,
    RAY_KINDS,
    ROOT,
    Resource,
    cluster_spec,
    containers,
    entrypoint_args,
    hub_ids,
    one,
    pod_specs,
    quantity,
    rendered,
    serve_app,
)

SECRET_ENV = {"DIFFGUARD_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}


# --- parsing and rendering ---
def test_every_yaml_file_parses_and_every_resource_is_named():
    files = sorted(
        f
        for f in K8S.rglob("*.yaml")
        if f.name != "checkov-skips.yaml"  # that one: test_k8s_checkov.py
        and "node_modules" not in f.parts  # npm's (k8s/tools), not ours
    )
    assert {"rayservice.yaml", "rayjob-scan.yaml"} <= {f.name for f in files if f.parent == K8S}
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        for doc in docs:
            if isinstance(doc, list):  # a JSON 6902 patch
                assert all({"op", "path"} <= set(op) for op in doc), path
            else:
                assert {"apiVersion", "kind"} <= set(doc), path
                assert doc["kind"] in ("Kustomization", "Component") or doc["metadata"]["name"], path


def test_the_issue_paths_are_the_base_manifests():
    for name in ("rayservice.yaml", "rayjob-scan.yaml"):
        assert (K8S / name).resolve() == (K8S / "base" / name).resolve()


@pytest.mark.parametrize(
    "overlay, kinds",
    [
        ("dev", ["NetworkPolicy", "RayService", "ServiceAccount"]),
        ("dev/scan", ["NetworkPolicy", "RayJob", "ServiceAccount"]),
        # + k8s/monitoring: the PodMonitors (endpoint Ray, HAProxy, scan), the alerts, the Grafana dashboard
        (
            "prod",
            ["ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "PodMonitor", "PodMonitor", "PodMonitor"]
            + ["PrometheusRule", "RayService", "ServiceAccount"],
        ),
        ("prod/scan", ["NetworkPolicy", "RayJob", "ServiceAccount"]),
    ],
)
def test_each_overlay_renders_one_workload(overlay, kinds):
    assert sorted(r["kind"] for r in rendered(overlay)) == kinds


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_endpoint_and_scan_overlays_run_the_one_image_their_kustomization_names(env):
    (image,) = yaml.safe_load((K8S / "overlays" / env / "kustomization.yaml").read_text())["images"]
    wanted = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for overlay in (env, f"{env}/scan"):
        for resource in rendered(overlay):
            if resource["kind"] in RAY_KINDS:
                assert {c["image"] for c in containers(resource)} == {wanted}, overlay


# --- Serve configs ---
@pytest.mark.parametrize("overlay", ["base", "dev", "prod"])
def test_serve_config_v2_validates_and_its_import_path_imports(overlay):
    from ray.serve.schema import ServeDeploySchema

    from deployments.settings import AppArgs

    schema = ServeDeploySchema.model_validate(yaml.safe_load(one(overlay, "RayService")["spec"]["serveConfigV2"]))
    assert schema.http_options.host == "0.0.0.0"  # a Service can only reach a proxy listening on the pod's address
    assert schema.proxy_location == "EveryNode"  # KubeRay's worker readiness probe asks the worker's own proxy
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert module.split(".")[0] == "deployments"
        assert callable(getattr(importlib.import_module(module), attr))
        AppArgs(**app.args)


def test_serve_configs_are_the_deployments_configs():
    assert sync.stale() == [], "run `make k8s` (python -m k8s.sync)"
    production = (ROOT / "deployments/configs/production.yaml").read_text()
    for overlay in ("base", "prod"):
        serve_config = one(overlay, "RayService")["spec"]["serveConfigV2"]
        assert serve_config == production.rstrip("\n") + "\n"  # verbatim, comments included
    local = yaml.safe_load((ROOT / "deployments/configs/local.yaml").read_text())
    dev = yaml.safe_load(one("dev", "RayService")["spec"]["serveConfigV2"])
    assert dev == sync.merge_patch(local, sync.DEV_OVERRIDES)


def test_the_service_exposes_the_serve_port_and_unhealthy_thresholds_are_set():
    service = one("prod", "RayService")
    spec = service["spec"]
    assert spec["serveService"]["metadata"]["name"] == "diffguard-serve"
    assert spec["serveService"]["spec"]["ports"] == [{"name": "serve", "port": 8000}]
    head = cluster_spec(service)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]  # KubeRay routes the Service to this port
    assert yaml.safe_load(spec["serveConfigV2"])["http_options"]["port"] == 8000
    assert spec["serviceUnhealthySecondThreshold"] > 0 and spec["deploymentUnhealthySecondThreshold"] > 0


# --- autoscaling at both levels ---
def replicas_needed(service: Resource, which: str) -> list[tuple[Fraction, Fraction]]:
    """(cpus, gpus) of every Serve replica when each deployment is at its ``min_replicas`` or ``max_replicas``."""
    items = []
    for d in serve_app(service)["deployments"]:
        options = d.get("ray_actor_options", {})
        auto = d.get("autoscaling_config")
        count = auto[f"{which}_replicas"] if auto else d.get("num_replicas", 1)
        items += [(Fraction(str(options.get("num_cpus", 1))), Fraction(str(options.get("num_gpus", 0))))] * count
    return items


def pods_needed(items: list[tuple[Fraction, Fraction]], cpus: Fraction, gpus: Fraction) -> int:
    """First-fit decreasing: how many identical worker pods hold these replicas (Ray never splits a replica)."""
    free: list[list[Fraction]] = []
    for cpu, gpu in sorted(items, key=lambda i: (i[1], i[0]), reverse=True):
        assert cpu <= cpus and gpu <= gpus, f"a replica needing {cpu} CPU / {gpu} GPU fits no worker pod"
        pod = next((p for p in free if p[0] >= cpu and p[1] >= gpu), None)
        if pod is None:
            free.append(pod := [cpus, gpus])
        pod[0] -= cpu
        pod[1] -= gpu
    return len(free)


def test_pods_needed_packs_fractional_gpus():
    generator, checker, ingress = (Fraction(2), Fraction(1)), (Fraction(1), Fraction(1, 4)), (Fraction(1, 2), 0)
    assert pods_needed([generator] * 4 + [checker] * 8 + [ingress] * 4, Fraction(8), Fraction(1)) == 6
    assert pods_needed([checker] * 5, Fraction(8), Fraction(1)) == 2
    assert pods_needed([ingress] * 5, Fraction(2), Fraction(0)) == 2


@pytest.mark.parametrize("overlay", ["base", "dev", "prod"])
def test_worker_replicas_match_the_serve_autoscaling_range(overlay):
    service = one(overlay, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head schedules no replica
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus, gpus = quantity(limits["cpu"]), quantity(limits.get(GPU, 0))
    at_min = pods_needed(replicas_needed(service, "min"), cpus, gpus)
    at_max = pods_needed(replicas_needed(service, "max"), cpus, gpus)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    if cluster.get("enableInTreeAutoscaling"):
        # Serve adds replicas between min_replicas and max_replicas; the Ray autoscaler adds the GPU pods they need.
        # Exactly: no GPU pod idles at Serve's minimum, and Serve's maximum fits.
        assert (group["minReplicas"], group["maxReplicas"]) == (at_min, at_max)
    else:
        assert group["replicas"] >= at_max, "without the Ray autoscaler the fixed workers must hold every maximum"
    assert cluster.get("enableInTreeAutoscaling") is (overlay != "dev")


# --- GPUs, dev, scans ---
@pytest.mark.parametrize(
    "overlay, kind", [("base", "RayService"), ("base", "RayJob"), ("prod", "RayService"), ("prod/scan", "RayJob")]
)
def test_gpu_workers_request_gpus_and_tolerate_gpu_nodes(overlay, kind):
    (head, *workers) = pod_specs(one(overlay, kind))
    assert GPU not in str(head[1])
    for _, pod in workers:
        resources = pod["containers"][0]["resources"]
        assert quantity(resources["requests"][GPU]) == quantity(resources["limits"][GPU]) >= 1
        assert GPU_TOLERATION in pod["tolerations"]


@pytest.mark.parametrize("overlay", ["dev", "dev/scan"])
def test_dev_overlays_run_on_cpu_with_tiny_models(overlay):
    text = str(rendered(overlay))
    assert GPU not in text and "tolerations" not in text and "persistentVolumeClaim" not in text
    for resource in rendered(overlay):
        if resource["kind"] == "RayService":
            args = serve_app(resource)["args"]
            assert args["checker"]["model"] == args["generator"]["model"] == "tiny"
        elif resource["kind"] == "RayJob":
            args = entrypoint_args(resource)
            assert args.model == "tiny" and args.num_gpus == 0


@pytest.mark.parametrize("overlay", ["prod", "prod/scan"])
def test_prod_overlays_load_real_models(overlay):
    for resource in rendered(overlay):
        if resource["kind"] == "RayService":
            args = serve_app(resource)["args"]
            loaded = [args["checker"]["model"], args["generator"]["model"]]
        elif resource["kind"] == "RayJob":
            loaded = [entrypoint_args(resource).model]
        else:
            continue
        for model in loaded:
            assert hub_ids(model) == {model}, model  # a hub id, neither tiny nor a path baked into the image


PINNED = re.compile(r"[^@\s]+/[^@\s]+@[0-9a-f]{40}")


@pytest.mark.parametrize("overlay", ["base", "prod", "prod/scan"])
def test_every_hub_model_in_prod_is_pinned_to_a_commit(overlay):
    """Two pods never load different weights under one id: every hub id carries @<40-hex commit>, everywhere."""
    specs = []
    for resource in rendered(overlay):
        if resource["kind"] == "RayService":
            args = serve_app(resource)["args"]
            specs += [args["checker"]["model"], args["checker"].get("concept_text_model"), args["generator"]["model"]]
        elif resource["kind"] == "RayJob":
            scan = entrypoint_args(resource)
            specs += [scan.model, scan.concept_text_model]
        if resource["kind"] in RAY_KINDS:
            for container in containers(resource):
                if container.get("command") == ["python", "-m", "k8s.model_cache"]:
                    fetch = model_cache.parse_args(container["args"])
                    specs += fetch.pipeline + fetch.model
    assert specs and hub_ids(*specs)
    for spec in hub_ids(*specs):
        assert PINNED.fullmatch(spec), f"{overlay}: hub model {spec!r} is not pinned as ID@<40-hex commit>"
    production = yaml.safe_load((ROOT / "deployments/configs/production.yaml").read_text())
    args = production["applications"][0]["args"]
    for spec in hub_ids(args["checker"]["model"], args["checker"]["concept_text_model"], args["generator"]["model"]):
        assert PINNED.fullmatch(spec), spec


@pytest.mark.parametrize("overlay", ["base", "dev/scan", "prod/scan"])
def test_rayjob_runs_diffguard_scan_on_a_bucket_and_cleans_up(overlay):
    job = one(overlay, "RayJob")
    args = entrypoint_args(job)
    assert args.command == "scan" and args.source.startswith("s3://") and args.output.startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    worker_gpus = [quantity(p["containers"][0]["resources"]["limits"].get(GPU, 0)) for _, p in pod_specs(job)[1:]]
    assert args.num_gpus <= max(worker_gpus)
    assert (args.num_gpus > 0) == (max(worker_gpus) > 0)  # GPU workers are used, and only then asked for


# --- secrets ---
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
    assert "secretKeyRef" not in str(everything) and "secretRef" not in str(everything)  # secrets are files
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
    (account,) = [
        r for r in rendered(overlay) if r["kind"] == "ServiceAccount" and r["metadata"]["name"] == "diffguard-endpoint"
    ]
    assert account["automountServiceAccountToken"] is False
    if overlay == "prod":  # the workload identity placeholders, for EKS (IRSA) and GKE
        annotations = account["metadata"]["annotations"]
        assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


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
    (account,) = [
        r for r in rendered(overlay) if r["kind"] == "ServiceAccount" and r["metadata"]["name"] == "diffguard-scan"
    ]
    assert account["automountServiceAccountToken"] is False
    if overlay == "prod/scan":  # the workload identity placeholders, for EKS (IRSA) and GKE
        annotations = account["metadata"]["annotations"]
        assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def test_dev_scan_reads_minio_keys_from_a_credentials_file():
    for name, pod in pod_specs(one("dev/scan", "RayJob")):
        container = pod["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert secret_file(container, pod, env["AWS_SHARED_CREDENTIALS_FILE"]) == ("diffguard-s3", "credentials", False)
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name


# --- the model cache ---
def assert_fills_the_cache_the_pod_reads(init: Resource, pod: Resource) -> None:
    assert init["command"] == ["python", "-m", "k8s.model_cache"]
    main = pod["containers"][0]
    home = {e["name"]: e.get("value") for e in init["env"]}["HF_HOME"]
    assert home == {e["name"]: e.get("value") for e in main["env"]}["HF_HOME"]
    assert init["volumeMounts"][0] in main["volumeMounts"] and home.startswith(init["volumeMounts"][0]["mountPath"])


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_model_cache_init_containers_fetch_what_the_endpoint_loads(overlay):
    args = serve_app(one(overlay, "RayService"))["args"]
    generator, checker = args.get("generator") or {}, args["checker"]
    for _, pod in pod_specs(one(overlay, "RayService"))[1:]:  # the head runs no replica
        (init,) = pod["initContainers"]
        fetch = model_cache.parse_args(init["args"])
        assert set(fetch.pipeline) == hub_ids(generator.get("model"))
        assert set(fetch.model) == hub_ids(
            checker["model"], checker.get("concept_text_model"), generator.get("text_encoder")
        )
        assert_fills_the_cache_the_pod_reads(init, pod)


@pytest.mark.parametrize("overlay", ["base", "prod/scan"])
def test_model_cache_init_containers_fetch_what_the_scan_loads(overlay):
    job = one(overlay, "RayJob")
    scan = entrypoint_args(job)
    # The checker, and the CLIP text tower that text concepts of the policy need (the default one if unnamed).
    wanted = hub_ids(scan.model, scan.concept_text_model or models.DEFAULT_TEXT_TOWER)
    for _, pod in pod_specs(job):  # the driver on the head loads the checker too (for its fingerprint)
        (init,) = pod["initContainers"]
        assert set(model_cache.parse_args(init["args"]).model) == wanted
        assert_fills_the_cache_the_pod_reads(init, pod)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_serving_ray_container_sets_the_serving_ray_environment(overlay):
    """Ray reads its system settings when it starts: every Ray container of the RayService (head and workers) sets
    what `diffguard serve` sets on the Ray it starts (deployments/run.py SERVING_RAY_ENV), with HAProxy as the front."""
    from deployments.run import SERVING_RAY_ENV

    for resource in rendered(overlay):
        if resource["kind"] != "RayService":
            continue
        for group, pod in pod_specs(resource):
            env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}  # the Ray container
            assert {k: env.get(k) for k in SERVING_RAY_ENV} == SERVING_RAY_ENV, (overlay, group)
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", (overlay, group)
