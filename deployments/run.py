"""Deploy a Serve config file on a (local or remote) Ray cluster, the same way `serve run CONFIG` and KubeRay do."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DeployFailed, InvalidInput

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"


def load_config(path: str | Path | None = None, host: str | None = None, port: int | None = None) -> Any:
    """A Serve config file -> validated ``ServeDeploySchema`` (HTTP host/port overridable)."""
    path = Path(path or DEFAULT_CONFIG)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read Serve config {path}: {exc}") from None
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
    from .auth import api_key, require_key_or_loopback
    from .settings import AppArgs

    for app in schema.applications:
        if app.import_path != "deployments.app:build_app":
            continue
        try:
            args = AppArgs(**(app.args or {}))
        except ValueError as exc:
            raise InvalidInput(f"application {app.name!r}: invalid args: {exc}") from None
        key = api_key(ingress_environment(app, environ))
        require_key_or_loopback(schema.http_options.host, key, args.ingress.allow_unauthenticated)


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
