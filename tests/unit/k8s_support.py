"""Reading the KubeRay manifests in tests: the base as written, the overlays as `kubectl apply -k` sees them."""

from __future__ import annotations

import copy
import functools
import re
import shlex
import tomllib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from k8s import kustomize

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["dev", "dev/scan", "prod", "prod/scan"]
RAY_KINDS = ("RayService", "RayJob", "RayCluster")
GPU = "nvidia.com/gpu"

Resource = dict[str, Any]


@functools.cache
def rendered(overlay: str) -> tuple[Resource, ...]:
    """``base`` as written, or an overlay as ``kubectl apply -k`` would see it."""
    return tuple(kustomize.build(K8S / "base" if overlay == "base" else K8S / "overlays" / overlay))


def one(overlay: str, kind: str) -> Resource:
    (resource,) = [r for r in rendered(overlay) if r["kind"] == kind]
    return copy.deepcopy(resource)


def ray_resources() -> list[tuple[str, Resource]]:
    """Every Ray resource: the base and every overlay, labelled ``overlay:Kind``."""
    out = []
    for overlay in ["base", *OVERLAYS]:
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


def containers(resource: Resource) -> Iterator[Resource]:
    for _, pod in pod_specs(resource):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


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
    """The hub ids among model specs (not ``tiny``, not a path)."""
    return {s for s in specs if s and s != "tiny" and not s.startswith((".", "/", "~"))}
