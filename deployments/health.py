"""Replica state from the Serve controller, cached briefly: ``/healthz`` never queues behind renders or batches.

One controller call refreshes the snapshot at most once per ``FRESH_S`` per Ingress replica, however many probes
arrive; a probe answers from the snapshot while a refresh runs (up to ``STALE_S`` old), and waits for the controller
only when there is no usable snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("ray.serve")

FRESH_S = 1.0  # a snapshot this young is used as is
STALE_S = 10.0  # an older one (up to this age) is still answered from while a refresh runs in the background
KEEP = ("max_ongoing_requests", "max_queued_requests", "autoscaling_config", "user_config", "num_replicas")


def _name(status: Any) -> str | None:
    return None if status is None else str(getattr(status, "value", status))  # enums as their plain names


class ReplicaState:
    """The app's deployments as the controller reports them: status, running replicas, settings.

    >>> state = ReplicaState("diffguard", timeout_s=5)   # inside an Ingress replica
    >>> await state.ready({"checker": "SafetyChecker"})  # {"checker": "ready"} or {"checker": "unavailable: ..."}
    """

    def __init__(self, app_name: str, timeout_s: float):
        self.app_name, self.timeout_s = app_name, timeout_s
        self._snapshot: dict[str, Any] | None = None
        self._taken = 0.0  # time.monotonic() of the snapshot
        self._refresh: asyncio.Task | None = None

    async def _fetch(self) -> dict[str, Any]:
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        details = await asyncio.wait_for(controller.get_serve_instance_details.remote(), self.timeout_s)
        self._snapshot = details["applications"][self.app_name]["deployments"]
        self._taken = time.monotonic()
        return self._snapshot

    async def deployments(self) -> dict[str, Any]:
        """The controller's deployment details of this app (raises when there is no usable snapshot)."""
        age = time.monotonic() - self._taken
        if self._snapshot is not None and age <= FRESH_S:
            return self._snapshot
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._fetch())
            self._refresh.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "never retrieved"
        if self._snapshot is not None and age <= STALE_S:
            return self._snapshot
        return await asyncio.shield(self._refresh)

    async def ready(self, deployments: dict[str, str]) -> dict[str, str]:
        """``label -> "ready"`` when the deployment has a running replica, else ``"unavailable: <why>"``."""
        try:
            details = await self.deployments()
        except Exception as exc:  # noqa: BLE001 - the controller is unreachable or slow: not ready
            why = "did not answer" if isinstance(exc, TimeoutError) else f"failed ({type(exc).__name__})"
            return {label: f"unavailable: the Serve controller {why}" for label in deployments}
        out = {}
        for label, name in deployments.items():
            d = details.get(name)
            running = sum(r.get("state") == "RUNNING" for r in d.get("replicas", [])) if d else 0
            status = _name(d.get("status")) if d else "absent"
            out[label] = "ready" if running else f"unavailable: no running replica (deployment {status})"
        return out

    async def settings(self) -> dict[str, Any]:
        """Each deployment's live settings (replicas, autoscaling, user_config); informational."""
        try:
            details = await self.deployments()
        except Exception as exc:  # noqa: BLE001 - informational only
            return {"error": f"unavailable ({type(exc).__name__})"}
        return {
            name: {
                "status": _name(d.get("status")),
                "replicas": len(d.get("replicas", [])),
                **{k: d.get("deployment_config", {}).get(k) for k in KEEP},
            }
            for name, d in details.items()
        }


def http_host() -> str | None:
    """The host Serve's HTTP proxies bind, as the controller knows it (None when it cannot be asked)."""
    import ray
    from ray.serve.context import _get_global_client

    try:
        return ray.get(_get_global_client()._controller.get_http_config.remote(), timeout=30).host
    except Exception as exc:  # noqa: BLE001 - unknown counts as reachable by others (the rule fails closed)
        log.warning("could not read the HTTP host from the Serve controller: %r", exc)
        return None
