"""The keys file: who holds which API key, by the SHA-256 of the key (the keys themselves are never stored), and what
each key may do: its tenant, policy, routes and limits.

The format is a contract (the review app reads ``id``, ``reviewer`` and ``sha256``; the service reads the rest)::

    keys:
      - id: kids-app            # unique; who holds the key (the review app records it on decisions)
        reviewer: "Ana Ruiz"    # optional: the name the review app records instead of the id
        sha256: 9f86d0...       # hex SHA-256 of the key sent as `Authorization: Bearer <key>`
        tenant: kids            # optional (default: the id): whose requests these are, in metrics and the audit log
        policy: strict          # optional (default: the service's own): a name under the Serve config's `policies:`,
                                # or default | stock | block | blur | black (the service checks: `check_policies`)
        routes: [generate, moderate]                                  # optional (default: all of ROUTES)
        limits: {requests_per_s: 5, burst: 10, images_per_min: 600}  # optional; absent = unlimited
    tenants:                    # optional: settings per tenant, each tenant named by some key
      kids: {log_prompt_text: false}  # the audit log keeps a prompt's text only when true (default: only its SHA-256)

Other fields of an entry are ignored (room to grow). A tenant's settings are on each of its keys
(``Key.log_prompt_text``) and by name (``KeyRing.tenant_settings``). A malformed file is refused, naming the file, the
entry, the field, the value and what is allowed. A key is found by its hash, compared in constant time.

:class:`KeysFile` holds the last good ring of a file that may change while the service runs (a Kubernetes Secret
volume): ``poll()`` re-reads it, swaps in a new ring when its content changed, and keeps the last good ring when the
new content is malformed. Plain Python: no Ray, no FastAPI, no threads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .auth import ENV, FILE_ENV, api_key
from .errors import AuthConfigError

KEYS_ENV = "DIFFGUARD_KEYS_FILE"
ROUTES: tuple[str, ...] = ("generate", "moderate", "info")  # what a key's `routes:` may name
LIMIT_NAMES: tuple[str, ...] = ("requests_per_s", "burst", "images_per_min")  # what a key's `limits:` may name
TENANT_SETTINGS: tuple[str, ...] = ("log_prompt_text",)  # what a tenant's settings may name
SINGLE_ID, SINGLE_TENANT = "api-key", "default"  # the single DIFFGUARD_API_KEY's entry
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Limits:
    """A key's rate limits; None = no such limit. ``Limits()`` is unlimited.

    >>> Limits.parse({"requests_per_s": 2.5}).burst
    3
    """

    requests_per_s: float | None = None  # sustained requests per second (> 0)
    burst: int | None = None  # requests allowed at once, the bucket's size (>= 1; default ceil(requests_per_s))
    images_per_min: int | None = None  # images (generated or moderated) per minute, also the most at once (>= 1)

    def __post_init__(self):
        if self.requests_per_s is not None and self.burst is None:
            object.__setattr__(self, "burst", max(1, math.ceil(self.requests_per_s)))

    @property
    def unlimited(self) -> bool:
        return self.requests_per_s is None and self.images_per_min is None

    def as_dict(self) -> dict[str, float | int]:
        """The limits set, for a handle call (``Limits.parse(limits.as_dict()) == limits``)."""
        return {n: getattr(self, n) for n in LIMIT_NAMES if getattr(self, n) is not None}

    @classmethod
    def parse(cls, value: Any, where: str = "limits") -> Limits:
        """Limits from a mapping (None or empty: unlimited); :class:`AuthConfigError` naming ``where`` and the field."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise AuthConfigError(
                f"{where}: `limits` must be a mapping of {', '.join(LIMIT_NAMES)}, got {_kind(value)}"
            )
        unknown = sorted(str(n) for n in value if n not in LIMIT_NAMES)
        if unknown:
            raise AuthConfigError(f"{where}: unknown limit {', '.join(unknown)} in `limits`; allowed: {LIMIT_NAMES}")
        rate, burst, images = (value.get(n) for n in LIMIT_NAMES)
        if rate is not None and (not _number(rate) or not math.isfinite(rate) or rate <= 0):
            raise AuthConfigError(f"{where}: `limits.requests_per_s` must be a number > 0, got {rate!r}")
        for name, n in (("burst", burst), ("images_per_min", images)):
            if n is not None and (not _number(n) or not math.isfinite(n) or n != int(n) or n < 1):
                raise AuthConfigError(f"{where}: `limits.{name}` must be a whole number >= 1, got {n!r}")
        if burst is not None and rate is None:
            raise AuthConfigError(f"{where}: `limits.burst` ({burst!r}) needs `limits.requests_per_s` beside it")
        return cls(
            requests_per_s=None if rate is None else float(rate),
            burst=None if burst is None else int(burst),
            images_per_min=None if images is None else int(images),
        )


@dataclass(frozen=True)
class TenantSettings:
    """One tenant's settings (the keys file's ``tenants:``)."""

    log_prompt_text: bool = False  # the audit log keeps a prompt's text only when true (else only its SHA-256)


@dataclass(frozen=True)
class Key:
    """One entry of a keys file."""

    id: str  # unique in the file
    reviewer: str  # the name recorded on what the key's holder does (default: the id)
    sha256: bytes  # the SHA-256 of the key (32 bytes)
    tenant: str = ""  # whose requests these are (default, and when empty: the id)
    policy: str | None = None  # a policy name the service knows; None: the service's own policy
    routes: frozenset[str] = frozenset(ROUTES)  # the routes the key may call, a subset of ROUTES
    limits: Limits = field(default_factory=Limits)  # its rate limits (default: none)
    log_prompt_text: bool = False  # its tenant's setting: the audit log keeps prompts' text (else only their SHA-256)

    def __post_init__(self):
        if not self.tenant:
            object.__setattr__(self, "tenant", self.id)


class KeyRing:
    """The keys a front accepts, by digest.

    >>> ring = KeyRing.single("s3cret", reviewer="ana")
    >>> ring.find("Bearer s3cret").reviewer
    'ana'
    """

    def __init__(self, keys: Iterable[Key], source: str, tenants: Mapping[str, TenantSettings] | None = None):
        self.keys = tuple(keys)
        self.source = source  # where they came from, for messages: a file, or the single key's name
        self.tenants = dict(tenants or {})  # the settings of the tenants the file lists; others get the defaults
        self.digest = hashlib.sha256(_canonical(self.keys, self.tenants).encode()).hexdigest()  # tells changed content

    @classmethod
    def single(cls, key: str, reviewer: str, source: str = "the API key") -> KeyRing:
        return cls([Key(id=reviewer, reviewer=reviewer, sha256=hashlib.sha256(key.encode()).digest())], source)

    def find(self, header: str | None) -> Key | None:
        """The entry whose key an ``Authorization: Bearer <key>`` header carries; None when none does. Every entry is
        compared (constant time each), so the time taken says nothing about which entry nearly matched."""
        scheme, _, token = (header or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256) and found is None:
                found = key
        return found if scheme.lower() == "bearer" and token.strip() else None

    def tenant_settings(self, tenant: str) -> TenantSettings:
        """The settings of ``tenant``: the file's ``tenants:`` entry, else the defaults."""
        return self.tenants.get(tenant, TenantSettings())

    def __len__(self) -> int:
        return len(self.keys)


def ring_for_single(key: str) -> KeyRing:
    """The single ``DIFFGUARD_API_KEY``: id ``api-key``, tenant ``default``, own policy, every route, no limits."""
    digest = hashlib.sha256(key.encode()).digest()
    return KeyRing([Key(id=SINGLE_ID, reviewer=SINGLE_ID, sha256=digest, tenant=SINGLE_TENANT)], "the API key")


def load_keys(path: str | Path, *, service: bool = True) -> KeyRing:
    """The keys file at ``path`` (AuthConfigError naming the file, entry and field when wrong); ``service=False`` (the
    review app) reads only ``id``, ``reviewer`` and ``sha256``, leaving the service's fields to the service."""
    return parse_keys(_read(path), str(path), service=service)


def parse_keys(data: bytes | str, path: str, *, service: bool = True) -> KeyRing:
    """The keys file's content ``data`` (read from ``path``, named in messages)."""
    import yaml

    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise AuthConfigError(f"keys file {path!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        raise AuthConfigError(
            f"keys file {path!r}: expected a mapping with a non-empty list `keys:` "
            f"(each entry `id:` and `sha256:`), got {_kind(doc)}"
        )
    keys: list[Key] = []
    for i, entry in enumerate(doc["keys"]):
        if not service and isinstance(entry, dict):  # the review app: the service's fields are the service's to check
            entry = {k: entry[k] for k in ("id", "reviewer", "sha256") if k in entry}
        keys.append(_entry(path, i, entry, keys))
    tenants = _tenants(path, doc.get("tenants") if service else None, keys)
    keys = [replace(k, log_prompt_text=tenants.get(k.tenant, TenantSettings()).log_prompt_text) for k in keys]
    return KeyRing(keys, f"keys file {path!r}", tenants)


def check_policies(ring: KeyRing, allowed: Iterable[str]) -> None:
    """Refuse a ring with a key whose ``policy`` is neither in ``allowed`` (the service's configured names) nor a
    keyword (default, stock, block, blur, black): :class:`AuthConfigError` naming the key, the policy and the names."""
    from .policy import KEYWORDS

    names = sorted(set(allowed)) + [k for k in KEYWORDS if k not in set(allowed)]
    for key in ring.keys:
        if key.policy is not None and key.policy not in names:
            raise AuthConfigError(
                f"{ring.source}: key {key.id!r} names policy {key.policy!r}, which the service does not have; "
                f"allowed: {', '.join(names)} (the Serve config's `policies:` names, or a keyword)"
            )


class KeysFile:
    """A keys file that may change while the service runs; ``ring`` is always the last good content.

    >>> keys = KeysFile("/etc/diffguard/keys/keys.yaml", policies=["strict"])  # doctest: +SKIP
    >>> keys.load()      # the first load raises on a malformed file: refuse to start   # doctest: +SKIP
    >>> keys.poll()      # every second: None, or why a changed file was refused (the old ring stays)  # doctest: +SKIP
    >>> keys.find("Bearer s3cret")  # doctest: +SKIP

    The file is read through its path each time (a Secret volume swaps its ``..data`` symlink), and a reload is the
    content changing: the bytes first, then the ring's digest (a comment edited is no reload). Swapping ``ring`` is
    one attribute assignment: read ``keys.ring`` once per request and use that ring throughout.
    """

    def __init__(self, path: str | Path, policies: Iterable[str] | None = None, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.policies = None if policies is None else tuple(policies)  # given: each load runs check_policies
        self.clock = clock
        self.ring: KeyRing | None = None  # the last good ring
        self.error: str | None = None  # why the file's current content was refused; None once a load succeeds
        self.reloads = 0  # rings swapped in after the first
        self.failures = 0  # changed contents refused (the same bad content is counted once)
        self.loaded_at: float | None = None  # when ``ring`` was swapped in (``clock``: seconds since the epoch)
        self._seen: bytes | str | None = None  # the bytes last read, or the read error last met

    def load(self) -> KeyRing:
        """Read and parse the file now; :class:`AuthConfigError` when it is wrong (at start: refuse to start)."""
        self._seen = data = _read(self.path)
        self._swap(self._parse(data))
        return self.ring  # type: ignore[return-value]

    def poll(self) -> str | None:
        """Re-read the file; swap in its ring when its content changed. None when it did not change or loaded; the
        error (also kept in ``error``) when the changed content is refused, the last good ring staying in force."""
        if self.ring is None:
            self.load()
            return None
        try:
            data: bytes | str = _read(self.path)
        except AuthConfigError as exc:
            data = exc.message
        if data == self._seen:
            return self.error
        self._seen = data
        try:
            if isinstance(data, str):
                raise AuthConfigError(data)
            ring = self._parse(data)
        except AuthConfigError as exc:
            self.failures += 1
            self.error = f"{exc.message} (still in force: the keys loaded before, digest {self.ring.digest[:12]})"
            return self.error
        self._swap(ring)
        return None

    def find(self, header: str | None) -> Key | None:
        """:meth:`KeyRing.find` on the last good ring."""
        if self.ring is None:
            raise RuntimeError(f"keys file {str(self.path)!r} has not been loaded: call load() first")
        return self.ring.find(header)

    def _swap(self, ring: KeyRing) -> None:
        self.error = None
        if self.ring is None or ring.digest != self.ring.digest:
            self.reloads += self.ring is not None
            self.ring, self.loaded_at = ring, self.clock()

    def _parse(self, data: bytes) -> KeyRing:
        ring = parse_keys(data, str(self.path))
        if self.policies is not None:
            check_policies(ring, self.policies)
        return ring


def service_keys(environ: Mapping[str, str], policies: Iterable[str] | None = None) -> KeysFile | KeyRing | None:
    """The keys the service accepts: a loaded :class:`KeysFile` (``$DIFFGUARD_KEYS_FILE``), else the single API key
    as a ring (:func:`ring_for_single`), else None (no key: the start-up rule decides whether that may run). A keys file
    with an API key is refused, as is an empty ``$DIFFGUARD_KEYS_FILE`` or a keys file that is wrong."""
    path = environ.get(KEYS_ENV)
    if path is not None:
        both = [n for n in (ENV, FILE_ENV) if environ.get(n) is not None]
        if both:
            raise AuthConfigError(
                f"both {KEYS_ENV} ({path!r}) and {' and '.join(both)} are set: set only one "
                f"(with a keys file, every key is one of its entries, with its tenant, policy and limits)"
            )
        if not path.strip():
            raise AuthConfigError(f"{KEYS_ENV} is set but empty: name a keys file, or unset it")
        keys = KeysFile(path, policies)
        keys.load()
        return keys
    key = api_key(environ)
    return None if key is None else ring_for_single(key)


def _entry(path: str, i: int, entry: Any, seen: list[Key]) -> Key:
    where = f"keys file {path!r}: keys[{i}]"
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where}: expected a mapping with `id` and `sha256`, got {_kind(entry)}")
    ident = entry.get("id")
    if not isinstance(ident, str) or not ident.strip():
        raise AuthConfigError(f"{where}: `id` must be a non-empty string, got {ident!r}")
    ident = ident.strip()
    where = f"{where} (id {ident!r})"
    if any(k.id == ident for k in seen):
        raise AuthConfigError(f"{where}: `id` {ident!r} is already used by an earlier entry; ids must be unique")
    reviewer = entry.get("reviewer", ident)
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise AuthConfigError(f"{where}: `reviewer` must be a non-empty string when given, got {reviewer!r}")
    digest = entry.get("sha256")
    if isinstance(digest, int | float):  # YAML read an all-digit digest as a number
        raise AuthConfigError(f"{where}: `sha256` was read as the number {digest!r}: write the 64 hex digits in quotes")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.strip()):
        raise AuthConfigError(
            f"{where}: `sha256` must be 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`), "
            f"got {digest!r}"
        )
    raw = bytes.fromhex(digest.strip())
    if any(k.sha256 == raw for k in seen):
        raise AuthConfigError(f"{where}: `sha256` is the same as an earlier entry's; each key must be different")
    tenant = entry.get("tenant", ident)
    if not isinstance(tenant, str) or not tenant.strip():
        raise AuthConfigError(f"{where}: `tenant` must be a non-empty string when given, got {tenant!r}")
    policy = entry.get("policy")
    if policy is not None and (not isinstance(policy, str) or not policy.strip()):
        raise AuthConfigError(
            f"{where}: `policy` must be a policy name (the Serve config's `policies:`, or default, stock, block, "
            f"blur, black) when given, got {policy!r}"
        )
    routes, limits = _routes(where, entry.get("routes", list(ROUTES))), Limits.parse(entry.get("limits"), where)
    policy = None if policy is None else policy.strip()
    return Key(ident, reviewer.strip(), raw, tenant.strip(), policy, routes, limits)


def _routes(where: str, value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(r, str) for r in value):
        raise AuthConfigError(f"{where}: `routes` must be a non-empty list of {', '.join(ROUTES)}, got {value!r}")
    value = [r.removeprefix("/v1/") for r in value]  # the route's path names it too: /v1/moderate is moderate
    unknown = [r for r in value if r not in ROUTES]
    if unknown:
        raise AuthConfigError(f"{where}: unknown route {', '.join(map(repr, unknown))} in `routes`; allowed: {ROUTES}")
    return frozenset(value)


def _tenants(path: str, value: Any, keys: list[Key]) -> dict[str, TenantSettings]:
    where = f"keys file {path!r}: tenants"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AuthConfigError(f"{where}: expected a mapping of tenant name to settings, got {_kind(value)}")
    named = sorted({k.tenant for k in keys})
    tenants = {}
    for name, settings in value.items():
        if name not in named:  # a misspelt tenant's settings would apply to nobody
            raise AuthConfigError(f"{where}: tenant {name!r} is the tenant of no key; the keys' tenants: {named}")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise AuthConfigError(f"{where}.{name}: expected a mapping of settings, got {_kind(settings)}")
        unknown = sorted(str(n) for n in settings if n not in TENANT_SETTINGS)
        if unknown:
            raise AuthConfigError(f"{where}.{name}: unknown setting {', '.join(unknown)}; allowed: {TENANT_SETTINGS}")
        log_text = settings.get("log_prompt_text", False)
        if not isinstance(log_text, bool):
            raise AuthConfigError(f"{where}.{name}: `log_prompt_text` must be true or false, got {log_text!r}")
        tenants[name] = TenantSettings(log_prompt_text=log_text)
    return tenants


def _canonical(keys: tuple[Key, ...], tenants: Mapping[str, TenantSettings]) -> str:
    rows = [
        {**k.__dict__, "sha256": k.sha256.hex(), "routes": sorted(k.routes), "limits": k.limits.as_dict()} for k in keys
    ]
    return json.dumps({"keys": rows, "tenants": {n: s.__dict__ for n, s in sorted(tenants.items())}}, sort_keys=True)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"keys file {str(path)!r} cannot be read: {exc.strerror or exc}") from None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "an empty file" if value is None else f"{type(value).__name__} {str(value)[:60]!r}"
