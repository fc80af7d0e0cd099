"""The API key rule, in one place for every HTTP front diffguard starts: the Serve ingress (``diffguard serve``) and the
review app (``diffguard review``).

The key is ``DIFFGUARD_API_KEY``, stripped of surrounding whitespace (a key file's trailing newline is not part of the
key). Set but empty or whitespace: refused. Unset: a front may start only on a loopback host (the Serve ingress also
when its config says ``allow_unauthenticated: true``). Clients send ``Authorization: Bearer <key>``, compared in
constant time. Plain Python: no Ray, no FastAPI.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping

from .errors import AuthConfigError

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


def authorized(header: str | None, key: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>`` (constant-time); always true without a key."""
    if key is None:  # only ever None where the start-up rule allowed it (loopback, or allow_unauthenticated)
        return True
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
