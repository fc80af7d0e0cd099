"""KubeRay manifests: every overlay renders what it should, the Serve configs are the deployments' configs, worker
pods match Serve's autoscaling, GPUs, dev and scans are wired right, hub models are pinned, and no secret value is in
a manifest. Rendered with `kubectl kustomize` (skipped, saying so, where kubectl is absent).

Also: test_k8s_secrets.py (secrets as files, the keys file, the audit log's and scans' identities),
test_k8s_placement.py (pools, headroom, head loss, budgets), test_k8s_grace.py (drains), test_k8s_front.py (TLS),
test_k8s_crds.py (the KubeRay CRDs), test_k8s_schemas.py (core schemas), test_k8s_security.py (Ray token auth,
pod hardening, NetworkPolicies, workload identity), test_k8s_checkov.py, test_k8s_image.py (Dockerfile, Ray pin,
docs), test_k8s_tools.py."""

from __future__ import annotations

import importlib
import re

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
        # + the TLS front (Gateway, HTTPRoute) and a PodDisruptionBudget for the head and each worker group
        (
            "prod",
            ["ConfigMap", "Gateway", "HTTPRoute", "NetworkPolicy", "PersistentVolumeClaim"]
            + ["PodDisruptionBudget"] * 3
            + ["PodMonitor", "PodMonitor", "PodMonitor", "PrometheusRule", "RayService", "ServiceAccount"],
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


def test_the_service_exposes_the_worker_serve_ports_and_sets_no_inert_fields():
    service = one("prod", "RayService")
    spec = service["spec"]
    assert spec["serveService"]["metadata"]["name"] == "diffguard-serve"
    assert spec["serveService"]["spec"]["ports"] == [{"name": "serve", "port": 8000}]
    assert spec["excludeHeadPodFromServeSvc"] is True  # the Service selects workers only
    for _, pod in pod_specs(service)[1:]:
        assert {"name": "serve", "containerPort": 8000} in pod["containers"][0]["ports"]  # the Service's target
    assert yaml.safe_load(spec["serveConfigV2"])["http_options"]["port"] == 8000
    # Inert since KubeRay v1.1 (probes and Serve's own health checks replaced them): not set, so nobody relies on them.
    assert "serviceUnhealthySecondThreshold" not in spec and "deploymentUnhealthySecondThreshold" not in spec


# --- GPUs, dev, scans ---
@pytest.mark.parametrize(
    "overlay, kind", [("base", "RayService"), ("base", "RayJob"), ("prod", "RayService"), ("prod/scan", "RayJob")]
)
def test_gpu_workers_request_gpus_and_tolerate_gpu_nodes(overlay, kind):
    """Every GPU pool's pods ask for a whole GPU on a GPU node; the head and the scan's decode pool for none."""
    resource = one(overlay, kind)
    (head, *_) = pod_specs(resource)
    assert GPU not in str(head[1])
    for group in cluster_spec(resource)["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        if group["labels"]["diffguard.io/pool"] == "decode":
            assert GPU not in str(pod), group["groupName"]
            continue
        assert quantity(resources["requests"][GPU]) == quantity(resources["limits"][GPU]) >= 1
        assert GPU_TOLERATION in pod["tolerations"]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"], group["groupName"]  # the accelerator is chosen


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
    rules = job["spec"]["deletionStrategy"]["deletionRules"]
    # Every end (success, failure, a failed deployment) frees the workers at once and the head later; rules mode
    # excludes the legacy fields, which KubeRay refuses beside it.
    ends = [{"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}]
    for end in ends:
        ttl = {r["policy"]: r["condition"]["ttlSeconds"] for r in rules if end.items() <= r["condition"].items()}
        assert ttl["DeleteWorkers"] == 0 and ttl["DeleteCluster"] > 0, (end, ttl)
    assert "shutdownAfterJobFinishes" not in job["spec"] and "ttlSecondsAfterFinished" not in job["spec"]
    assert job["spec"]["preRunningDeadlineSeconds"] > 0
    assert job["spec"]["backoffLimit"] > 0  # a retry resumes (docs/SCANS.md): only unscored objects are scored
    worker_gpus = [quantity(p["containers"][0]["resources"]["limits"].get(GPU, 0)) for _, p in pod_specs(job)[1:]]
    assert args.num_gpus <= max(worker_gpus)
    assert (args.num_gpus > 0) == (max(worker_gpus) > 0)  # GPU workers are used, and only then asked for


# --- the model cache ---
def assert_fills_the_cache_the_pod_reads(init: Resource, pod: Resource) -> None:
    assert init["command"] == ["python", "-m", "k8s.model_cache"]
    main = pod["containers"][0]
    home = {e["name"]: e.get("value") for e in init["env"]}["HF_HOME"]
    assert home == {e["name"]: e.get("value") for e in main["env"]}["HF_HOME"]
    assert init["volumeMounts"][0] in main["volumeMounts"] and home.startswith(init["volumeMounts"][0]["mountPath"])


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_model_cache_init_containers_fetch_what_the_endpoint_loads(overlay):
    """Each pool fetches what its replicas load: the generation pool the pipeline, the checking pool the checker and
    the CLIP text tower (the head runs no replica and fetches nothing)."""
    service = one(overlay, "RayService")
    args = serve_app(service)["args"]
    generator, checker = args.get("generator") or {}, args["checker"]
    wanted = {
        "generation": (hub_ids(generator.get("model")), hub_ids(generator.get("text_encoder"))),
        "checking": (set(), hub_ids(checker["model"], checker.get("concept_text_model"))),
    }
    assert "initContainers" not in pod_specs(service)[0][1]
    for group in cluster_spec(service)["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (init,) = pod["initContainers"]
        fetch = model_cache.parse_args(init["args"])
        assert (set(fetch.pipeline), set(fetch.model)) == wanted[group["labels"]["diffguard.io/pool"]]
        assert_fills_the_cache_the_pod_reads(init, pod)


@pytest.mark.parametrize("overlay", ["base", "prod/scan"])
def test_model_cache_init_containers_fetch_what_the_scan_loads(overlay):
    job = one(overlay, "RayJob")
    scan = entrypoint_args(job)
    # The checker, and the CLIP text tower that text concepts of the policy need (the default one if unnamed).
    wanted = hub_ids(scan.model, scan.concept_text_model or models.DEFAULT_TEXT_TOWER)
    # the driver on the head loads the checker too (for its fingerprint); the decode pool loads no model
    loaders = [(name, pod) for name, pod in pod_specs(job) if name != "decode"]
    assert [name for name, _ in loaders] == ["head", "scoring"]
    assert "initContainers" not in dict(pod_specs(job))["decode"]
    for _, pod in loaders:
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


@pytest.mark.parametrize("overlay", ["base", "prod", "prod/scan"])
def test_containers_that_load_models_never_call_the_hub(overlay):
    """Every Ray container reading the model cache (HF_HOME) loads offline (HF_HUB_OFFLINE=1: no Hub call at each
    start); only the model-cache init containers, which download, go online."""
    seen = 0
    for resource in rendered(overlay):
        if resource["kind"] not in RAY_KINDS:
            continue
        for _, pod in pod_specs(resource):
            for container in pod.get("initContainers", []):
                assert "HF_HUB_OFFLINE" not in {e["name"] for e in container["env"]}, container["name"]
            for container in pod["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if "HF_HOME" in env:
                    assert env.get("HF_HUB_OFFLINE") == "1", (overlay, container["name"])
                    seen += 1
    assert seen >= 2, overlay
