"""The audit log's rows: the Arrow schema, the keys a caller passes, and their validation.

A caller's row is a dict with exactly :data:`ROW_KEYS` (``day`` and ``replica`` are filled in by the log); each
image in ``images`` a dict with exactly :data:`IMAGE_KEYS`. :func:`conform` checks one and returns it ready for Arrow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from ..errors import InvalidInput

ROUTES = ("generate", "moderate")
SHA256 = re.compile(r"[0-9a-f]{64}")

IMAGE_TYPE = pa.struct(
    [
        ("sha256", pa.string()),  # of the bytes returned (generate) or uploaded (moderate); null when withheld/none
        ("filename", pa.string()),  # the upload's name (moderate), null otherwise
        ("nsfw", pa.bool_()),  # the stock checker's own decision
        ("flagged", pa.list_(pa.string())),  # the categories hit
        ("categories", pa.string()),  # JSON: category -> score
        ("action", pa.string()),  # what the policy did: allow | flag | blur | black | block
        ("views", pa.int32()),  # views scored
        ("error", pa.string()),  # why the image was unscorable; null when scored
    ]
)

SCHEMA = pa.schema(
    [
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),  # when the decision was answered
        pa.field("day", pa.string(), nullable=False),  # YYYY-MM-DD of `time` (UTC): the partition, for retention
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("key_id", pa.string()),  # the API key's id (null: no key configured)
        pa.field("tenant", pa.string()),
        pa.field("route", pa.string(), nullable=False),  # generate | moderate
        pa.field("status", pa.int32(), nullable=False),  # the HTTP status answered
        pa.field("latency_ms", pa.float64()),
        pa.field("prompt_sha256", pa.string()),
        pa.field("prompt", pa.string()),  # the text only for tenants that ask (log_prompt_text)
        pa.field("seed", pa.int64()),
        pa.field("params", pa.string()),  # JSON: the generation parameters
        pa.field("images", pa.list_(IMAGE_TYPE), nullable=False),
        pa.field("policy", pa.string()),  # the policy's name
        pa.field("policy_fingerprint", pa.string()),
        pa.field("models", pa.string()),  # JSON: the models' fingerprints
        pa.field("error", pa.string()),  # a refused or failed request's message; null when answered
        pa.field("replica", pa.string(), nullable=False),  # who wrote the row (AuditLog's `replica`)
    ]
)
FILLED = ("day", "replica")  # set by the log, not the caller
ROW_KEYS = tuple(n for n in SCHEMA.names if n not in FILLED)
IMAGE_KEYS = tuple(f.name for f in IMAGE_TYPE)
JSON_FIELDS = ("params", "models")


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ValueError(f"audit row: `{field}` is {shown} ({type(value).__name__}); allowed: {allowed}")


def _str(row: Mapping[str, Any], field: str, nullable: bool = True) -> str | None:
    value = row[field]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise _bad(field, value, "a string" + (" or None" if nullable else ""))
    return value


def _json(row: Mapping[str, Any], field: str) -> str | None:
    """A JSON text as given, or a dict/list dumped (sorted keys); None stays None."""
    value = row[field]
    if value is None:
        return None
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            raise _bad(field, value, "JSON text, a dict, a list or None") from None
        return value
    raise _bad(field, value, "JSON text, a dict, a list or None")


def _keys(row: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"{what} is a {type(row).__name__}; allowed: a dict with keys {', '.join(keys)}")
    missing, unknown = [k for k in keys if k not in row], sorted(set(row) - set(keys))
    if missing or unknown:
        raise ValueError(f"{what}: missing keys {missing}, unknown keys {unknown}; allowed: exactly {', '.join(keys)}")


def conform_image(image: Any, index: int) -> dict[str, Any]:
    _keys(image, IMAGE_KEYS, f"audit row: images[{index}]")
    name = f"images[{index}]."
    out: dict[str, Any] = {k: _str(image, k) for k in ("filename", "error")}
    digest = image["sha256"]
    if digest is not None and not (isinstance(digest, str) and SHA256.fullmatch(digest)):
        raise _bad(name + "sha256", digest, "64 lowercase hex digits or None")
    flagged = image["flagged"]
    if not isinstance(flagged, list | tuple) or not all(isinstance(c, str) for c in flagged):
        raise _bad(name + "flagged", flagged, "a list of strings")
    if not isinstance(image["nsfw"], bool):
        raise _bad(name + "nsfw", image["nsfw"], "True or False")
    views = image["views"]
    if isinstance(views, bool) or not isinstance(views, int) or not 0 <= views < 2**31:
        raise _bad(name + "views", views, "an integer >= 0")
    action = image["action"]
    if not isinstance(action, str) or not action:
        raise _bad(name + "action", action, "a policy action: allow, flag, blur, black or block")
    categories = _json({name + "categories": image["categories"]}, name + "categories")
    return out | {
        "sha256": digest,
        "nsfw": image["nsfw"],
        "flagged": list(flagged),
        "categories": categories,
        "action": action,
        "views": views,
    }


def conform(row: Any, replica: str = "") -> dict[str, Any]:
    """A caller's row checked field by field (``ValueError`` naming the field, the value and what is allowed), with
    ``day`` and ``replica`` filled in and dict-valued JSON fields dumped."""
    _keys(row, ROW_KEYS, "audit row")
    when = row["time"]
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise _bad("time", when, "a timezone-aware datetime")
    when = when.astimezone(UTC)
    route = row["route"]
    if route not in ROUTES:
        raise _bad("route", route, " | ".join(ROUTES))
    status = row["status"]
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise _bad("status", status, "an HTTP status, an integer in [100, 599]")
    latency = row["latency_ms"]
    if latency is not None and (isinstance(latency, bool) or not isinstance(latency, int | float) or latency < 0):
        raise _bad("latency_ms", latency, "a number >= 0 or None")
    seed = row["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63):
        raise _bad("seed", seed, "a 64-bit integer or None")
    digest = row["prompt_sha256"]
    if digest is not None and not (isinstance(digest, str) and SHA256.fullmatch(digest)):
        raise _bad("prompt_sha256", digest, "64 lowercase hex digits or None")
    images = row["images"]
    if not isinstance(images, list | tuple):
        raise _bad("images", images, "a list of image dicts (possibly empty)")
    out = {k: _str(row, k) for k in ("key_id", "tenant", "prompt", "policy", "policy_fingerprint", "error")}
    return out | {
        "time": when,
        "day": when.strftime("%Y-%m-%d"),
        "request_id": _str(row, "request_id", nullable=False),
        "route": route,
        "status": status,
        "latency_ms": None if latency is None else float(latency),
        "prompt_sha256": digest,
        "seed": seed,
        "params": _json(row, "params"),
        "images": [conform_image(image, i) for i, image in enumerate(images)],
        "models": _json(row, "models"),
        "replica": replica,
    }


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Conformed rows as one Arrow table of :data:`SCHEMA`."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


# --- durations and times ----------------------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` -> a positive :class:`timedelta`."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or float(match[1]) <= 0:
        raise InvalidInput(f"{what} {text!r}: expected a positive number and a unit s, m, h, d or w (90d, 12h, 30m)")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def parse_since(text: str, now: datetime | None = None, what: str = "--since") -> datetime:
    """An ISO 8601 time (UTC when it names no zone; a date alone is its midnight) or a duration ago (``"1h"``)."""
    if isinstance(text, str) and _DURATION.fullmatch(text.strip()):
        return (now or datetime.now(UTC)) - parse_duration(text, what)
    try:
        when = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError, TypeError):
        raise InvalidInput(
            f"{what} {text!r}: expected an ISO 8601 time (2025-01-31, 2025-01-31T12:00:00Z) or a duration ago (1h, 7d)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
