"""The Serve front's start-up checks over the core's API key rule (:mod:`pipeline.auth`, shared with the review app).

The key is ``DIFFGUARD_API_KEY`` in the Ingress replicas' environment, stripped (empty refused). Unset: the service may
start only on a loopback host, unless its config says ``allow_unauthenticated: true``. Ray-free and cheap to import.
"""

from __future__ import annotations

from typing import Any

from pipeline.auth import ENV, api_key, authorized, is_loopback  # the one rule, shared with the review app
from pipeline.errors import AuthConfigError


def require_key_or_loopback(host: str | None, key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve without a key on a host others can reach, unless the config opts in explicitly."""
    if key is None and not allow_unauthenticated and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to serve without an API key on host {host!r}, which is not loopback: set {ENV} in the "
            f"Ingress replicas' environment, bind 127.0.0.1, or set `allow_unauthenticated: true` in the ingress "
            f"args of the Serve config"
        )


def auth_info(key: str | None, allow_unauthenticated: bool, host: str | None) -> dict[str, Any]:
    """What ``/v1/info`` reports about authentication (never the key)."""
    return {"required": key is not None, "allow_unauthenticated": allow_unauthenticated, "host": host}


__all__ = ["ENV", "api_key", "auth_info", "authorized", "is_loopback", "require_key_or_loopback"]
