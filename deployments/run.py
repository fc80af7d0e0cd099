"""Deploy a Serve config file on a (local or remote) Ray cluster, the same way `serve run CONFIG` and KubeRay do."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DiffguardError, InvalidInput

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"


class DeployFailed(DiffguardError):
    status_code = 500


def load_config(path: str | Path | None = None, host: str | None = None, port: int | None = None) -> Any:
    """A Serve config file -> validated ``ServeDeploySchema`` (HTTP host/port overridable)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    path = Path(path or DEFAULT_CONFIG)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read Serve config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"Serve config {path} must be a mapping with `applications`")
    http = raw.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"Serve config {path} is invalid: {exc}") from None


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
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise DeployFailed(f"deployment failed: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise DeployFailed(f"applications not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)


def url(schema: Any) -> str:
    host = schema.http_options.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{schema.http_options.port}"
