"""Reading the KubeRay manifests in tests: the base and the overlays as ``kubectl kustomize`` renders them (the same
renderer ``kubectl apply -k`` uses), and the Ray pod templates as the Pods KubeRay makes of them."""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["dev", "dev/scan", "prod", "prod/scan"]
RAY_KINDS = ("RayService", "RayJob", "RayCluster")
GPU = "nvidia.com/gpu"
KUBECTL = shutil.which("kubectl")
NO_KUBECTL = "kubectl is not on PATH: the overlays are rendered with `kubectl kustomize` (install kubectl; CI has it)"

Resource = dict[str, Any]


@functools.cache
def rendered(overlay: str) -> tuple[Resource, ...]:
    """``base``, or an overlay, as ``kubectl kustomize`` renders it (skips the test where kubectl is absent)."""
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    directory = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def one(overlay: str, kind: str) -> Resource:
    (resource,) = [r for r in rendered(overlay) if r["kind"] == kind]
    return copy.deepcopy(resource)


def ray_resources(overlays: list[str] | None = None) -> list[tuple[str, Resource]]:
    """Every Ray resource: the base and every overlay (or those named), labelled ``overlay:Kind``."""
    out = []
    for overlay in overlays or ["base", *OVERLAYS]:
        out += [(f"{overlay}:{r['kind']}", r) for r in rendered(overlay) if r["kind"] in RAY_KINDS]
    return out


def cluster_spec(resource: Resource) -> Resource:
    spec = resource["spec"]
    return spec["rayClusterConfig"] if resource["kind"] == "RayService" else spec["rayClusterSpec"]


def pod_specs(resource: Resource) -> list[tuple[str, Resource]]:
    """(group, pod spec): the head first, then every worker group."""
    cluster = cluster_spec(resource)
    groups = [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return [("head", cluster["headGroupSpec"]["template"]["spec"]), *groups]


def pod_templates(resource: Resource) -> list[tuple[str, Resource]]:
    """(group, pod template) of every pod KubeRay makes for this resource: head, workers, and a RayJob's submitter."""
    cluster = cluster_spec(resource)
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if resource["kind"] == "RayJob" and "submitterPodTemplate" in resource["spec"]:
        out.append(("submitter", resource["spec"]["submitterPodTemplate"]))
    return out


def as_pods(resource: Resource) -> list[Resource]:
    """The pod templates as Pods named ``<resource>-<group>``, labelled as KubeRay labels them from the template."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{resource['metadata']['name']}-{group}", **copy.deepcopy(template["metadata"])},
            "spec": copy.deepcopy(template["spec"]),
        }
        for group, template in pod_templates(resource)
    ]


def containers(resource: Resource) -> Iterator[Resource]:
    """Every container of every pod (init containers and the submitter's included)."""
    for _, template in pod_templates(resource):
        yield from template["spec"].get("initContainers", [])
        yield from template["spec"]["containers"]


def quantity(q: Any) -> Fraction:
    text = str(q)
    return Fraction(text[:-1]) / 1000 if text.endswith("m") else Fraction(text)


def serve_app(service: Resource) -> Resource:
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app


def entrypoint_args(job: Resource):
    """The RayJob's entrypoint through the real ``diffguard`` parser: a typo or a removed flag fails here."""
    from pipeline.cli import build_parser

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "diffguard", argv
    return build_parser().parse_args(argv[1:])


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (version,) = [m[1] for d in deps if (m := re.fullmatch(r"ray\[[^\]]*\]==(\S+)", d))]
    return version


def hub_ids(*specs: str | None) -> set[str]:
    """The hub ids among model specs (not ``tiny``, not a path), ``@revision`` included."""
    return {s for s in specs if s and s != "tiny" and not s.startswith((".", "/", "~"))}
