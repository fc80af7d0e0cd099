"""Every RayService, RayJob and the RayCluster each creates validates against the KubeRay v1.7.0 CRDs'
openAPIV3Schema, with unknown fields refused. Skipped, saying why and how to get them, where the CRDs are absent (a
user's clone: docs/KUBERNETES.md, "The KubeRay CRDs")."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.k8s_support import OVERLAYS, ROOT, Resource, cluster_spec, one, ray_resources

# The CRDs sit beside the repository (not in a clone of it); KUBERAY_CRDS points elsewhere.
CRDS = Path(os.environ.get("KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds")
HOW_TO_GET = (
    "they are not in the repository; set KUBERAY_CRDS to a folder holding "
    "ray.io_{rayclusters,rayjobs,rayservices}.yaml, e.g. KubeRay's ray-operator/config/crd/bases at tag v1.7.0 "
    "(git clone --depth 1 --branch v1.7.0 https://github.com/ray-project/kuberay) or the crds/ folder of "
    "`helm pull kuberay/kuberay-operator --version 1.7.0 --untar` (docs/KUBERNETES.md)"
)


def closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (kubectl's strict field validation), so typos fail the test."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    nested = ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")
    out = {k: closed(v) if k in nested else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay v1.7.0 CRDs not found at {CRDS}: {HOW_TO_GET}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~20k lines: libyaml reads them 6x faster
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return jsonschema.Draft7Validator(closed(v1["schema"]["openAPIV3Schema"]))


def schema_errors(resource: Resource) -> list[str]:
    validator = crd_validator(resource["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_ray_resources_validate_against_the_kuberay_crds(overlay):
    resources = ray_resources([overlay])
    assert resources
    for label, resource in resources:
        assert resource["apiVersion"] == "ray.io/v1", label
        assert schema_errors(resource) == [], label
        # The cluster a RayService or RayJob creates is a RayCluster: its spec must validate as one too.
        as_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"}}
        assert schema_errors({**as_cluster, "spec": cluster_spec(resource)}) == [], label


def test_crd_validation_catches_typos_and_wrong_types():
    resource = one("prod", "RayService")
    cluster = resource["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["maxReplica"] = 6  # typo
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    resource["spec"]["serviceUnhealthySecondsThreshold"] = 900  # the real field is serviceUnhealthySecondThreshold
    cluster["authOptions"]["mode"] = "Token"  # the enum is lower case
    errors = "\n".join(schema_errors(resource))
    assert "maxReplica'" in errors and "num-cpus" in errors and "serviceUnhealthySecondsThreshold" in errors, errors
    assert "authOptions/mode" in errors, errors
