"""Where the endpoint's and the scan's work lands, and what keeps it there: Ray node labels per worker group that the
Serve config's label_selector names, worker-group bounds with headroom over Serve's replica bounds, accelerator
nodeSelectors, topology spread, an on-demand head, the GCS store for head loss, and PodDisruptionBudgets whose
selectors survive an upgrade's cluster rename. Rendered with `kubectl kustomize` (tests/unit/k8s_support.py)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import yaml

from tests.unit.k8s_support import GPU, ROOT, Resource, cluster_spec, one, quantity, rendered, serve_app

POOL = "diffguard.io/pool"
SPOT = {"karpenter.sh/capacity-type", "eks.amazonaws.com/capacityType", "cloud.google.com/gke-spot"}
SURGE = 1  # a drained pod's replicas start on a spare pod before they stop


def deployments(service: Resource) -> dict[str, Resource]:
    return {d["name"]: d for d in serve_app(service)["deployments"]}


def groups(resource: Resource) -> dict[str, Resource]:
    return {g["groupName"]: g for g in cluster_spec(resource)["workerGroupSpecs"]}


def replicas(d: Resource, which: str) -> int:
    auto = d.get("autoscaling_config")
    return auto[f"{which}_replicas"] if auto else d.get("num_replicas", 1)


def needs(d: Resource) -> tuple[Fraction, Fraction]:
    options = d.get("ray_actor_options", {})
    return Fraction(str(options.get("num_cpus", 1))), Fraction(str(options.get("num_gpus", 0)))


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


def pod_size(group: Resource) -> tuple[Fraction, Fraction]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return quantity(limits["cpu"]), quantity(limits.get(GPU, 0))


def test_pods_needed_packs_fractional_gpus():
    generator, checker, ingress = (Fraction(2), Fraction(1)), (Fraction(1), Fraction(1, 4)), (Fraction(1, 2), 0)
    assert pods_needed([generator] * 4 + [checker] * 8 + [ingress] * 4, Fraction(8), Fraction(1)) == 6
    assert pods_needed([checker] * 5, Fraction(8), Fraction(1)) == 2
    assert pods_needed([ingress] * 5, Fraction(2), Fraction(0)) == 2


# --- the endpoint's pools ---
@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_each_gpu_deployment_selects_its_own_pool_and_the_ingress_any_worker(overlay):
    service = one(overlay, "RayService")
    selectors = {name: d["ray_actor_options"].get("label_selector") for name, d in deployments(service).items()}
    assert selectors == {"Ingress": None, "Generator": {POOL: "generation"}, "SafetyChecker": {POOL: "checking"}}
    assert {name: g["labels"] for name, g in groups(service).items()} == {
        "generation": {POOL: "generation"},
        "checking": {POOL: "checking"},
    }
    production = yaml.safe_load((ROOT / "deployments/configs/production.yaml").read_text())
    by_name = {d["name"]: d for d in production["applications"][0]["deployments"]}
    assert replicas(by_name["Ingress"], "min") >= 2 and replicas(by_name["Generator"], "min") >= 2  # one pod lost


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_worker_group_bounds_fit_serve_with_one_spare_pod(overlay):
    """generation: one Generator per GPU pod, min = min_replicas, max = max_replicas + 1 spare; checking: four ¼-GPU
    checkers per pod, min = ceil(min x 1/4), max = ceil(max x 1/4) + 1; the Ingress in the spare CPUs of either."""
    service = one(overlay, "RayService")
    cluster = cluster_spec(service)
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head schedules no replica
    ds, gs = deployments(service), groups(service)
    for pool, name in (("generation", "Generator"), ("checking", "SafetyChecker")):
        group, d = gs[pool], ds[name]
        cpus, gpus = pod_size(group)
        per_pod = int(gpus / needs(d)[1])  # replicas of this deployment per pod, by GPU
        assert per_pod == {"Generator": 1, "SafetyChecker": 4}[name]
        assert group["minReplicas"] == math.ceil(replicas(d, "min") / per_pod) <= group["replicas"], pool
        assert group["maxReplicas"] == math.ceil(replicas(d, "max") / per_pod) + SURGE, pool
        for which in ("min", "max"):  # Ray packs them as this test does
            assert pods_needed([needs(d)] * replicas(d, which), cpus, gpus) <= group[f"{which}Replicas"]
    # The Ingress (no selector) at its maximum fits in the CPUs the GPU replicas leave at their minimum.
    spare = sum(
        pod_size(gs[pool])[0] * gs[pool]["minReplicas"] - needs(ds[name])[0] * replicas(ds[name], "min")
        for pool, name in (("generation", "Generator"), ("checking", "SafetyChecker"))
    )
    assert needs(ds["Ingress"])[0] * replicas(ds["Ingress"], "max") <= spare


def test_dev_one_cpu_worker_holds_every_maximum():
    service = one("dev", "RayService")
    cluster = cluster_spec(service)
    assert cluster.get("enableInTreeAutoscaling") is False and "gcsFaultToleranceOptions" not in cluster
    (group,) = cluster["workerGroupSpecs"]
    items = [needs(d) for d in deployments(service).values() for _ in range(replicas(d, "max"))]
    assert all("label_selector" not in d.get("ray_actor_options", {}) for d in deployments(service).values())
    assert group["replicas"] >= pods_needed(items, *pod_size(group))


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_gpu_pools_spread_over_zones_and_nodes_within_one_cluster(overlay):
    for name, group in groups(one(overlay, "RayService")).items():
        pod = group["template"]["spec"]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"]
        keys = []
        for constraint in pod["topologySpreadConstraints"]:
            labels = kuberay_labels(group["template"], "diffguard-abcde", name)
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items(), name
            assert constraint["matchLabelKeys"] == ["ray.io/cluster"]  # an upgrade's two clusters spread apart
            keys.append(constraint["topologyKey"])
        assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"], name


@pytest.mark.parametrize("overlay", ["base", "prod", "dev"])
def test_the_head_stays_off_spot_capacity(overlay):
    head = cluster_spec(one(overlay, "RayService"))["headGroupSpec"]["template"]["spec"]
    (term,) = head["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    avoided = {e["key"] for e in term["matchExpressions"] if e["operator"] == "NotIn"}
    assert avoided >= SPOT, avoided


# --- head loss, upgrades ---
@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_the_gcs_keeps_its_state_in_redis_keyed_per_cluster(overlay):
    service = one(overlay, "RayService")
    ft = cluster_spec(service)["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].rpartition(":")
    assert host and port == "6379"
    assert ft["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "diffguard-redis", "key": "password"}}}
    # Unset: KubeRay keys each RayCluster by its UID, so an upgrade's new cluster never loads the old one's state.
    assert "externalStorageNamespace" not in ft and "ray.io/external-storage-namespace" not in str(service)
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}  # docs/KUBERNETES.md says why


# --- PodDisruptionBudgets ---
def kuberay_labels(template: Resource, cluster: str, group: str) -> dict[str, str]:
    """The labels KubeRay puts on a Ray pod: the template's plus its own (ray.io/*)."""
    node_type = "head" if group == "headgroup" else "worker"
    own = {"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group, "ray.io/is-ray-node": "yes"}
    return {**template["metadata"].get("labels", {}), **own}


def test_every_endpoint_pod_has_one_budget_that_survives_an_upgrade():
    """Both clusters of an upgrade (diffguard-<random> each) are covered by the same budgets: one for the head (no
    voluntary eviction), one per worker group (one pod at a time); none selects a scan's pods."""
    service = one("prod", "RayService")
    cluster = cluster_spec(service)
    pdbs = [r for r in rendered("prod") if r["kind"] == "PodDisruptionBudget"]
    for pdb in pdbs:
        assert "ray.io/cluster" not in pdb["spec"]["selector"]["matchLabels"], pdb["metadata"]["name"]
    templates = [("headgroup", cluster["headGroupSpec"]["template"])]
    templates += [(name, g["template"]) for name, g in groups(service).items()]
    for cluster_name in ("diffguard-abcde", "diffguard-fghij"):
        for group, template in templates:
            labels = kuberay_labels(template, cluster_name, group)
            (pdb,) = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            if group == "headgroup":
                assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"], pdb
            else:
                assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"], pdb
    scan = one("base", "RayJob")
    scan_templates = {"headgroup": cluster_spec(scan)["headGroupSpec"]["template"]}
    scan_templates |= {name: g["template"] for name, g in groups(scan).items()}
    for group, template in scan_templates.items():
        labels = kuberay_labels(template, "diffguard-scan-xyz", group)
        assert not [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()], group


# --- the scan ---
@pytest.mark.parametrize("overlay", ["base", "prod/scan"])
def test_the_scan_decodes_on_cpu_pods_and_scores_on_gpu_pods(overlay):
    job = one(overlay, "RayJob")
    gs = groups(job)
    assert {name: g["labels"] for name, g in gs.items()} == {"decode": {POOL: "decode"}, "scoring": {POOL: "scoring"}}
    assert pod_size(gs["decode"])[1] == 0 and pod_size(gs["decode"])[0] >= 8
    assert pod_size(gs["scoring"])[1] >= 1
    # The scoring pods offer Ray only the scoring actor's CPU (pipeline/scan/job.py: num_cpus=1 per Scorer).
    assert gs["scoring"]["rayStartParams"]["num-cpus"] == "1"
