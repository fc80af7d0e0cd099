"""The API key rule, in one place for ``diffguard serve`` (before deploying) and the Ingress replica (at start).

The key is ``DIFFGUARD_API_KEY`` in the Ingress replicas' environment, stripped of surrounding whitespace (a key
file's trailing newline is not part of the key). Set but empty or whitespace: refused. Unset: the service may start
only on a loopback host, unless its config says ``allow_unauthenticated: true``. Ray-free and cheap to import.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from typing import Any

from pipeline.errors import AuthConfigError

ENV = "DIFFGUARD_API_KEY"


def api_key(environ: Mapping[str, str]) -> str | None:
    """The stripped key from ``environ``; None when unset. An empty or whitespace-only value is refused."""
    raw = environ.get(ENV)
    if raw is None:
        return None
    key = raw.strip()
    if not key:
        raise AuthConfigError(
            f"{ENV} is set but empty or whitespace ({len(raw)} characters): set it to the key clients must send, "
            f"or unset it (then the service starts only on a loopback host, or with `allow_unauthenticated: true`)"
        )
    return key


def is_loopback(host: str | None) -> bool:
    """True for hosts only this machine can reach: 127.0.0.0/8, ::1 and ``localhost``."""
    if host is None:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve to anything


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


def authorized(header: str | None, key: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>`` (constant-time); always true without a key."""
    if key is None:  # only ever None where the start-up rule allowed it (loopback, or allow_unauthenticated)
        return True
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
