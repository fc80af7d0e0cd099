"""The API key rule, in one place for every HTTP front diffguard starts: the Serve ingress (``diffguard serve``) and the
review app (``diffguard review``).

The key is the content of the file ``DIFFGUARD_API_KEY_FILE`` names (a mounted Kubernetes Secret: the value stays out
of the process environment, ``/proc/<pid>/environ`` and ``ray list actors``), else ``DIFFGUARD_API_KEY``, stripped of
surrounding whitespace (a key file's trailing newline is not part of the key). Set but empty or whitespace:
refused. Unset: a front may start only on a loopback host (the Serve ingress also
when its config says ``allow_unauthenticated: true``). Clients send ``Authorization: Bearer <key>``, compared in
constant time. Plain Python: no Ray, no FastAPI.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from pathlib import Path

from .errors import AuthConfigError

ENV = "DIFFGUARD_API_KEY"
FILE_ENV = f"{ENV}_FILE"


def api_key(environ: Mapping[str, str]) -> str | None:
    """The stripped key from ``$DIFFGUARD_API_KEY_FILE``'s file or ``$DIFFGUARD_API_KEY``; None when neither is set.

    Fails closed: an empty or whitespace-only key, a key file that cannot be read, or both variables at once are
    refused rather than run without the key or with the wrong one.
    """
    raw, path = environ.get(ENV), environ.get(FILE_ENV)
    if path is not None:
        if raw is not None:
            raise AuthConfigError(f"both {ENV} and {FILE_ENV} are set: set only one (the file keeps the key private)")
        try:
            raw = Path(path).read_text()
        except OSError as exc:
            raise AuthConfigError(f"{FILE_ENV}={path!r} cannot be read: {exc.strerror or exc}") from None
    if raw is None:
        return None
    key = raw.strip()
    if not key:
        raise AuthConfigError(
            f"{f'the file {FILE_ENV}={path!r}' if path is not None else ENV} is set but empty or whitespace "
            f"({len(raw)} characters): set it to the key clients must send, "
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
