"""Who is calling: each request's key -> its tenant, the policy it is moderated with, the routes it may call and the
limits it draws from (:mod:`pipeline.keys`), kept current while the service runs.

The keys come from ``DIFFGUARD_KEYS_FILE`` (a mounted Secret), re-read every second by a thread in each Ingress
replica: a changed file takes effect within a second or two on every replica, a request already past the key check
finishes under the key it came with, and a malformed file keeps the last good one (logged, and counted in
``diffguard_keys_reload_failures``). A first start with a malformed file fails the replica (the error names the entry
and the field). The single ``DIFFGUARD_API_KEY`` is one key of tenant ``default`` under the service's own policy, and a
keyless service (loopback only) has one anonymous caller of that tenant. Ray-free: metrics are handed in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import AuthConfigError
from pipeline.keys import SINGLE_TENANT, Key, KeyRing, KeysFile, service_keys

log = logging.getLogger("ray.serve")

# The routes a key's `routes:` may list, by the path a request names; /v1/info is open to every valid key (it tells
# the caller only its own tenant and policy).
ROUTES = {"/v1/generate": "generate", "/v1/moderate": "moderate"}
POLL_S = 1.0  # how often each replica re-reads the keys file
# The one caller of a keyless service (loopback only, or `allow_unauthenticated: true`): the single key's tenant.
ANONYMOUS = Key(id="anonymous", reviewer="anonymous", sha256=b"", tenant=SINGLE_TENANT)


class Callers:
    """The keys an Ingress replica accepts, current to within ``poll_s`` of the file.

    >>> callers = Callers.from_environ(os.environ)     # DIFFGUARD_KEYS_FILE, DIFFGUARD_API_KEY or neither
    >>> callers.find("Bearer s3cret").tenant
    'kids'
    """

    def __init__(
        self,
        source: KeysFile | KeyRing | None,
        *,
        poll_s: float = POLL_S,
        on_reload: Callable[[str | None], None] | None = None,
    ):
        self.source, self.poll_s, self.on_reload = source, poll_s, on_reload
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **kwargs: Any) -> Callers:
        """The keys file, the single key, or none; a malformed file or both set raise :class:`AuthConfigError`."""
        return cls(service_keys(environ), **kwargs)

    @classmethod
    def single(cls, key: str | None) -> Callers:
        from pipeline.keys import ring_for_single

        return cls(ring_for_single(key) if key is not None else None)

    @property
    def required(self) -> bool:
        """Whether requests must carry a key (false only for a keyless service on loopback, or one opted in)."""
        return self.source is not None

    @property
    def ring(self) -> KeyRing | None:
        return self.source.ring if isinstance(self.source, KeysFile) else self.source

    @property
    def kind(self) -> str:
        return "keys_file" if isinstance(self.source, KeysFile) else "api_key" if self.source is not None else "none"

    def find(self, header: str | None) -> Key | None:
        """The caller an ``Authorization`` header names; None for a missing or wrong key (anonymous when keyless)."""
        ring = self.ring
        return ANONYMOUS if ring is None else ring.find(header)

    def start(self) -> None:
        """Poll a keys file in a daemon thread (nothing to poll for the single key)."""
        if isinstance(self.source, KeysFile) and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="diffguard-keys", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        source = self.source
        assert isinstance(source, KeysFile)
        while not self._stop.wait(self.poll_s):
            before, failures = source.ring, source.failures
            try:
                error = source.poll()
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any surprise; the last good ring stays
                error = f"{type(exc).__name__}: {exc}"
            else:
                error = error if source.failures > failures else None  # a refused change: said once, not each poll
            if error is not None:
                log.warning(
                    "keys file %s not reloaded, keeping the last good one (%d keys): %s",
                    source.path,
                    len(before),
                    error,
                )
            elif source.ring is not before:
                log.info("keys file %s reloaded: %d keys", source.path, len(source.ring))
            if self.on_reload is not None and (error is not None or source.ring is not before):
                self.on_reload(error)


def decision_route(path: str) -> str | None:
    """``generate`` or ``moderate`` for a decision route's path (under any route prefix), else None."""
    path = path.rstrip("/")
    return next((route for suffix, route in ROUTES.items() if path.endswith(suffix)), None)


def route_refusal(caller: Key, path: str) -> str | None:
    """Why ``caller`` may not call ``path``, or None when it may."""
    route = ROUTES.get(path)
    if route is None or route in caller.routes:
        return None
    allowed = ", ".join(sorted(caller.routes)) or "none"
    return f"key {caller.id!r} may not call {path} (its routes: {allowed})"


def caller_info(caller: Key) -> dict[str, Any]:
    """What ``/v1/info`` tells a caller about itself: its key id, tenant, policy (None: the service's own), routes and
    limits; nothing about any other key."""
    return {
        "key_id": caller.id,
        "tenant": caller.tenant,
        "policy": caller.policy,
        "routes": sorted(caller.routes - {"info"}),
        "limits": None if caller.limits.unlimited else caller.limits.as_dict(),
    }


def check_start(callers: Callers, host: str | None, allow_unauthenticated: bool) -> None:
    """The start-up rule with tenants: a keys file or a key may serve anywhere; none, only on loopback (or opted in)."""
    from .auth import require_key_or_loopback

    if not callers.required:
        require_key_or_loopback(host, None, allow_unauthenticated)


__all__ = ["ANONYMOUS", "ROUTES", "decision_route", "AuthConfigError", "Callers", "check_start", "route_refusal"]
