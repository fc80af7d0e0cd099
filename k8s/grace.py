"""One number sizes every drain and every wait on KubeRay: the longest request the endpoint answers.

    longest request           = generator_timeout_s + checker_timeout_s      (production.yaml's Ingress: 300 + 30 s)
    graceful_shutdown_timeout_s   Generator = generator_timeout_s, SafetyChecker = checker_timeout_s,
                                  Ingress = the longest request (it waits for both)
    preStop --deadline-s      = the longest request                          (k8s.prestop drains the Ray node)
    terminationGracePeriodSeconds = preStop deadline + PRESTOP_MARGIN_S      (every endpoint worker pod)
    rayClusterDeletionDelaySeconds = the longest request + DELETION_MARGIN_S (the old cluster after an upgrade)
    the TLS front's request timeout = the longest request + FRONT_MARGIN_S   (k8s/overlays/prod/front.yaml)

``python -m k8s.sync --check`` fails naming every manifest or config that holds another number
(``problems()``); tests/unit/test_k8s_grace.py asserts the same on the rendered overlays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PRODUCTION = "deployments/configs/production.yaml"
RAYSERVICE = "k8s/base/rayservice.yaml"
FRONT = "k8s/overlays/prod/front.yaml"

PRESTOP_MARGIN_S = 30  # after the preStop returns: SIGTERM to Ray, its processes' exit, before the kubelet's SIGKILL
DELETION_MARGIN_S = 30  # a request that began on the old cluster just before the switch, plus its pods' own drain
FRONT_MARGIN_S = 30  # the front waits a little longer than the Ingress, so the Ingress's own timeout answers first
PRESTOP = ["python", "-m", "k8s.prestop", "--deadline-s"]  # + str(deadline): helper module k8s/prestop.py


@dataclass(frozen=True)
class Grace:
    """The derived numbers, from the Ingress args of one Serve config.

    >>> g = Grace(generator_timeout_s=300, checker_timeout_s=30)
    >>> g.longest_request_s, g.termination_grace_period_s, g.prestop_deadline_s
    (330, 360, 330)
    """

    generator_timeout_s: int  # the Ingress waits this long for a Generator batch
    checker_timeout_s: int  # and this long for the SafetyChecker's verdict on it

    @property
    def longest_request_s(self) -> int:
        return self.generator_timeout_s + self.checker_timeout_s

    @property
    def graceful_shutdown_s(self) -> dict[str, int]:
        """Serve's graceful_shutdown_timeout_s per deployment: what each replica may still be busy with."""
        return {
            "Ingress": self.longest_request_s,
            "Generator": self.generator_timeout_s,
            "SafetyChecker": self.checker_timeout_s,
        }

    @property
    def prestop_deadline_s(self) -> int:
        return self.longest_request_s

    @property
    def termination_grace_period_s(self) -> int:
        return self.prestop_deadline_s + PRESTOP_MARGIN_S

    @property
    def cluster_deletion_delay_s(self) -> int:
        return self.longest_request_s + DELETION_MARGIN_S

    @property
    def front_timeout_s(self) -> int:
        return self.longest_request_s + FRONT_MARGIN_S

    @property
    def prestop_command(self) -> list[str]:
        return [*PRESTOP, str(self.prestop_deadline_s)]


def from_serve_config(config: dict[str, Any]) -> Grace:
    """The numbers of a Serve config (``applications[0].args.ingress``); integers, as the manifests need them."""
    (app,) = config["applications"]
    ingress = app["args"]["ingress"]
    times = {k: ingress[k] for k in ("generator_timeout_s", "checker_timeout_s")}
    for key, value in times.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"ingress.{key} must be a positive whole number of seconds, got {value!r}")
    return Grace(**times)


def production() -> Grace:
    return from_serve_config(yaml.safe_load((REPO / PRODUCTION).read_text()))


def serve_problems(config: dict[str, Any], grace: Grace, where: str) -> list[str]:
    """Deployments whose graceful_shutdown_timeout_s is not the derived one."""
    out = []
    (app,) = config["applications"]
    for deployment in app["deployments"]:
        want = grace.graceful_shutdown_s.get(deployment["name"])
        got = deployment.get("graceful_shutdown_timeout_s")
        if want is not None and got != want:
            out.append(f"{where}: {deployment['name']} graceful_shutdown_timeout_s is {got}, derived {want}")
    return out


def service_problems(service: dict[str, Any], grace: Grace, where: str) -> list[str]:
    """A RayService whose deletion delay, worker grace periods or preStop commands are not the derived ones."""
    out = []
    spec = service["spec"]
    if spec.get("rayClusterDeletionDelaySeconds") != grace.cluster_deletion_delay_s:
        got = spec.get("rayClusterDeletionDelaySeconds")
        out.append(f"{where}: rayClusterDeletionDelaySeconds is {got}, derived {grace.cluster_deletion_delay_s}")
    for group in spec["rayClusterConfig"].get("workerGroupSpecs", []):
        pod = group["template"]["spec"]
        name = group["groupName"]
        if pod.get("terminationGracePeriodSeconds") != grace.termination_grace_period_s:
            got = pod.get("terminationGracePeriodSeconds")
            out.append(
                f"{where}: {name} terminationGracePeriodSeconds is {got}, derived {grace.termination_grace_period_s}"
            )
        command = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if command != grace.prestop_command:
            out.append(f"{where}: {name} preStop is {command}, derived {grace.prestop_command}")
    return out


def front_problems(resources: list[dict[str, Any]], grace: Grace, where: str) -> list[str]:
    """HTTPRoutes whose rules time out before the longest request (or set no timeout the front would default)."""
    out = []
    for route in (r for r in resources if r.get("kind") == "HTTPRoute"):
        for i, rule in enumerate(route["spec"]["rules"]):
            got = rule.get("timeouts", {}).get("request")
            if got != f"{grace.front_timeout_s}s":
                out.append(
                    f"{where}: HTTPRoute {route['metadata']['name']} rule {i} timeout is {got}, derived "
                    f"{grace.front_timeout_s}s"
                )
    return out


def problems() -> list[str]:
    """Every place in the repository that holds a number other than the derived one."""
    grace = production()
    out = serve_problems(yaml.safe_load((REPO / PRODUCTION).read_text()), grace, PRODUCTION)
    (service,) = [d for d in yaml.safe_load_all((REPO / RAYSERVICE).read_text()) if d and d["kind"] == "RayService"]
    out += service_problems(service, grace, RAYSERVICE)
    out += front_problems([d for d in yaml.safe_load_all((REPO / FRONT).read_text()) if d], grace, FRONT)
    return out
