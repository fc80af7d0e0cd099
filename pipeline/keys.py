"""The keys file: who holds which API key, by the SHA-256 of the key (the keys themselves are never stored).

The format is a contract (the review app reads it today; the service's tenants will read it later)::

    keys:
      - id: ana                 # who holds the key: the reviewer recorded on her decisions
        reviewer: "Ana Ruiz"    # optional: the name recorded instead of the id
        sha256: 9f86d0...       # hex SHA-256 of the key she sends as `Authorization: Bearer <key>`

Other fields (``tenant``, ``policy``, ``routes``, ``limits``...) are ignored here. A file that cannot be read or is
malformed is refused, naming the file, the entry and the field. A key is found by hashing the bearer token and
comparing against every entry's digest in constant time. Plain Python: no Ray, no FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AuthConfigError

KEYS_ENV = "DIFFGUARD_KEYS_FILE"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Key:
    """One entry of a keys file."""

    id: str  # unique in the file
    reviewer: str  # the name recorded on what the key's holder does (default: the id)
    sha256: bytes  # the SHA-256 of the key (32 bytes)


class KeyRing:
    """The keys a front accepts, by digest.

    >>> ring = KeyRing.single("s3cret", reviewer="ana")
    >>> ring.find("Bearer s3cret").reviewer
    'ana'
    """

    def __init__(self, keys: Iterable[Key], source: str):
        self.keys = tuple(keys)
        self.source = source  # where they came from, for messages: a file, or the single key's name

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

    def __len__(self) -> int:
        return len(self.keys)


def load_keys(path: str | Path) -> KeyRing:
    """The keys file at ``path``; :class:`AuthConfigError` naming the file, the entry and the field when it is wrong."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthConfigError(f"keys file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AuthConfigError(f"keys file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        raise AuthConfigError(
            f"keys file {str(path)!r}: expected a mapping with a non-empty list `keys:` "
            f"(each entry `id:` and `sha256:`), got {_kind(doc)}"
        )
    keys: list[Key] = []
    for i, entry in enumerate(doc["keys"]):
        keys.append(_entry(str(path), i, entry, keys))
    return KeyRing(keys, f"keys file {str(path)!r}")


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
    return Key(id=ident, reviewer=reviewer.strip(), sha256=raw)


def _kind(value: Any) -> str:
    return "an empty file" if value is None else f"{type(value).__name__} {str(value)[:60]!r}"
