"""Deploy a Serve config file on a (local or remote) Ray cluster, the same way `serve run CONFIG` and KubeRay do."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DeployFailed, InvalidInput

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
# Ray's system settings for a serving cluster, read from the environment when Ray starts (`diffguard serve` sets them
# on the Ray it starts; k8s/base/rayservice.yaml on every Ray container). max_direct_call_object_size: task arguments
# and results below 2 MiB travel inline in the call instead of through the object store (a put, the raylet's pinning,
# a fetch), so a 512x512 PNG upload (~400 KB) reaches the checker in one message: 2.2 instead of 5.7 CPU-ms of Ray's
# own processes per image, and the checker 13 instead of 19 (docs/BENCHMARKS.md, "CPU per image outside the model").
SERVING_RAY_ENV = {"RAY_max_direct_call_object_size": str(2 * 1024 * 1024)}


def load_config(
    path: str | Path | None = None, host: str | None = None, port: int | None = None, audit_dest: str | None = None
) -> Any:
    """A Serve config file -> validated ``ServeDeploySchema`` (HTTP host/port and every diffguard app's
    ``audit_dest`` overridable)."""
    path = Path(path or DEFAULT_CONFIG)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read Serve config {path}: {exc}") from None
    if audit_dest is not None and "://" not in audit_dest:
        audit_dest = str(Path(audit_dest).resolve())  # the replicas' working directory is not this one's
    if audit_dest is not None and isinstance(raw, dict):
        for app in raw.get("applications") or []:
            if isinstance(app, dict) and app.get("import_path") == "deployments.app:build_app":
                args = app.setdefault("args", {}) or {}
                app["args"] = args
                args.setdefault("ingress", {})["audit_dest"] = audit_dest
    return config_schema(raw, host, port, where=str(path))


def config_schema(raw: Any, host: str | None = None, port: int | None = None, where: str = "(mapping)") -> Any:
    """A Serve config as a mapping (what :func:`load_config` reads from a file) -> validated ``ServeDeploySchema``."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(raw, dict):
        raise InvalidInput(f"Serve config {where} must be a mapping with `applications`")
    http = raw.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"Serve config {where} is invalid: {exc}") from None


def ingress_environment(app: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment an app's Ingress replicas get when this process starts the cluster: ``environ``, then the
    app's ``runtime_env`` env_vars, then the Ingress deployment's own."""
    env = dict(environ)
    env.update((app.runtime_env or {}).get("env_vars") or {})
    for d in app.deployments:
        if d.name == "Ingress":
            options = d.model_dump(exclude_unset=True).get("ray_actor_options") or {}
            env.update((options.get("runtime_env") or {}).get("env_vars") or {})
    return env


def check_auth(schema: Any, environ: Mapping[str, str]) -> None:
    """The Ingress replicas' start-up rule (``deployments.auth``), checked before anything is deployed: an empty key,
    or no key on a non-loopback host without ``allow_unauthenticated: true``, fails here with the same message."""
    from .settings import AppArgs
    from .tenancy import Callers, check_start

    for app in schema.applications:
        if app.import_path != "deployments.app:build_app":
            continue
        try:
            args = AppArgs(**(app.args or {}))
        except ValueError as exc:
            raise InvalidInput(f"application {app.name!r}: invalid args: {exc}") from None
        callers = Callers.from_environ(ingress_environment(app, environ))  # a malformed keys file fails here too
        check_start(callers, schema.http_options.host, args.ingress.allow_unauthenticated)


def deploy(schema: Any, timeout_s: float = 600) -> None:
    """Start Serve with the config's HTTP options, apply the config, and wait until every application runs."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    # The controller's apply_config path: the one `serve run CONFIG`, `serve deploy` and KubeRay use.
    _get_global_client().deploy_apps(schema, _blocking=False)
    wait_running([app.name for app in schema.applications], timeout_s)


def wait_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: _failure(apps[n]) for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise DeployFailed("deployment failed: " + "; ".join(f"{n}: {why}" for n, why in failed.items()))
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise DeployFailed(f"applications not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)


def wait_healthy(url: str, timeout_s: float, stop: threading.Event | None = None, poll_s: float = 0.5) -> bool:
    """Poll ``url`` (the app's ``/healthz``) until it answers 200, the moment a person's first request is served:
    an application is RUNNING a little before its Ingress reports every deployment ready. Returns False when ``stop``
    is set first; raises :class:`DeployFailed` with the last answer after ``timeout_s``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the service itself, never a proxy
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while not (stop is not None and stop.is_set()):
        try:
            with opener.open(url, timeout=10) as response:
                if response.status == 200:
                    return True
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:  # 503 until every deployment has a running replica
            last = f"HTTP {exc.code}: {exc.read(500).decode(errors='replace')}"
        except OSError as exc:  # not listening yet
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise DeployFailed(f"the applications are RUNNING but {url} did not answer 200 in {timeout_s:.0f}s: {last}")
        time.sleep(poll_s)
    return False


def stop_serve(timeout_s: float = 60) -> bool:
    """Shut Serve down, as ``serve.shutdown()`` does, and wait until its controller has exited. Returns False when
    the controller did not exit in time (the caller falls back to ``serve.shutdown()``).

    ``serve.shutdown()`` waits on ``graceful_shutdown()``, a call that ends only when the controller kills itself, so
    Ray reports that call as failed ("Task ServeController.graceful_shutdown failed ... killed by ray.kill"). Asked
    without waiting, the controller runs the same shutdown (applications deleted, replicas and proxies stopped) and
    exits; this waits for its named actor to be gone."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return True  # Serve is not running on this cluster
    try:
        ray.get(controller.graceful_shutdown.remote(wait=False), timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError):
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return True
        time.sleep(0.2)
    return False


def _failure(app: Any) -> str:
    """An app's failure with its failed deployments' own messages (where a replica's start-up error is)."""
    parts = [app.message] if app.message else []
    for name, d in app.deployments.items():
        if d.status in ("DEPLOY_FAILED", "UNHEALTHY") and d.message:
            parts.append(f"{name}: {d.message}")
    return "\n".join(parts)


def url(schema: Any) -> str:
    host = schema.http_options.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{schema.http_options.port}"
