"""Review decisions: an append-only, journalled Parquet table under the scan's DEST.

```
DEST/_review/decisions/part-<decided_at_ns>-<random>.parquet     one file per acknowledged decision (or batch)
```

Every file is created exclusively and whole (:meth:`Store.create`: locally a hard link of a complete, fsynced temp file;
on S3 a PUT with ``If-None-Match: *``), so a decision is acknowledged only once it is durable, a reader never sees half
a file, and no decision ever replaces another. The latest decision per ``(key, etag)`` wins (by ``decided_at``, then
file name); a decision whose etag differs from the object's current etag is **stale** (the object changed after the
review). Decisions attach to key + etag, not to the model fingerprint: rescoring keeps them.
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InvalidInput, StorageError
from .storage import Location, parse_location

log = logging.getLogger(__name__)

PREFIX = "_review/decisions/"
DECISIONS = ("confirm", "overturn", "relabel")  # the machine was right | a false positive | another category
SAFE = "safe"  # the label an overturned object gets
NOTE_MAX = 2000  # characters of a note
REVIEWER_MAX = 200  # characters of a reviewer name

SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the object's key, as in the scan's rows
        ("etag", pa.string()),  # of the version reviewed (the scan row's etag at decision time)
        (
            "fingerprint",
            pa.string(),
        ),  # the scan row's model_fingerprint when reviewed (informative: not part of the match)
        ("decision", pa.string()),  # confirm | overturn | relabel
        ("category", pa.string()),  # confirm: the top flagged category (null when none) | overturn: null | relabel: it
        ("note", pa.string()),  # free text, at most NOTE_MAX characters (null when none)
        ("reviewer", pa.string()),
        ("decided_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class Decision:
    key: str
    etag: str
    fingerprint: str | None
    decision: str
    category: str | None
    note: str | None
    reviewer: str
    decided_at: datetime

    def label(self) -> str | None:
        """The calibration label: confirm -> its category, overturn -> safe, relabel -> its category."""
        return SAFE if self.decision == "overturn" else self.category

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "decided_at": self.decided_at.isoformat()}


def validate(decision: Any, category: Any, note: Any, categories: set[str] | frozenset[str]) -> None:
    """Raise :class:`InvalidInput` naming the field, the value received and what is allowed."""
    if decision not in DECISIONS:
        raise InvalidInput(f"decision: got {decision!r}; allowed: {', '.join(DECISIONS)}")
    if decision == "relabel":
        if category not in categories:
            raise InvalidInput(
                f"category: got {category!r} for a relabel; allowed: one of the scan's categories {sorted(categories)}"
            )
    elif category is not None:
        raise InvalidInput(
            f"category: got {category!r} with decision {decision!r}; allowed: null (only relabel takes one)"
        )
    if note is not None and (not isinstance(note, str) or len(note) > NOTE_MAX):
        size = len(note) if isinstance(note, str) else type(note).__name__
        raise InvalidInput(f"note: got {size} characters; allowed: a string of at most {NOTE_MAX} characters")


class DecisionLog:
    """The decisions under one DEST: read once, then appended to (thread-safe).

    >>> log = DecisionLog(parse_location("s3://moderation/scans/uploads"))
    >>> log.append([Decision("a.png", "9f…", None, "overturn", None, "a beach", "ana", datetime.now(UTC))])
    >>> log.latest()[("a.png", "9f…")].decision
    'overturn'
    """

    def __init__(self, dest: Location):
        self.dest = dest
        self._lock = threading.Lock()
        self._all: list[Decision] = []
        self._latest: dict[tuple[str, str], Decision] = {}
        self._by_key: dict[str, Decision] = {}  # the latest decision on each key, whatever its etag
        for decision in self._read():
            self._remember(decision)

    @classmethod
    def open(cls, dest: str | Location, endpoint_url: str | None = None) -> DecisionLog:
        return cls(parse_location(dest, endpoint_url, "DEST") if isinstance(dest, str) else dest)

    def _read(self) -> list[Decision]:
        rows: list[tuple[datetime, str, int, dict[str, Any]]] = []
        for info in self.dest.store.list(self.dest.key(PREFIX)):
            name = info.key.rsplit("/", 1)[-1]
            if not (name.startswith("part-") and name.endswith(".parquet")):
                continue  # temp files of a write in flight are never read
            data, _ = self.dest.store.read(info.key)
            try:
                table = pq.read_table(io.BytesIO(data))
            except (pa.ArrowInvalid, OSError) as exc:
                raise StorageError(f"{self.dest.store.url(info.key)} is not a readable decisions file: {exc}") from None
            for i, row in enumerate(table.to_pylist()):
                rows.append((row["decided_at"], name, i, row))
        rows.sort(key=lambda r: r[:3])
        return [Decision(**{f: row.get(f) for f in SCHEMA.names}) for *_, row in rows]

    def _remember(self, decision: Decision) -> None:
        self._all.append(decision)
        pair = (decision.key, decision.etag)
        if pair not in self._latest or self._latest[pair].decided_at <= decision.decided_at:  # as a reread orders them
            self._latest[pair] = decision
        if decision.key not in self._by_key or self._by_key[decision.key].decided_at <= decision.decided_at:
            self._by_key[decision.key] = decision

    def append(self, decisions: list[Decision]) -> str:
        """Write the decisions as one new file, durably, then remember them. Returns the file's key."""
        if not decisions:
            raise InvalidInput("decisions: got an empty list; allowed: at least one decision")
        table = pa.Table.from_pylist([d.__dict__ for d in decisions], schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        stamp = int(max(d.decided_at for d in decisions).timestamp() * 1_000_000)
        key = self.dest.key(f"{PREFIX}part-{stamp:020d}-{secrets.token_hex(6)}.parquet")
        with self._lock:
            self.dest.store.create(key, buf.getvalue())  # exclusive and whole; raises before anything is remembered
            for decision in decisions:
                self._remember(decision)
        return key

    def all(self) -> list[Decision]:
        with self._lock:
            return list(self._all)

    def latest(self) -> dict[tuple[str, str], Decision]:
        """(key, etag) -> the decision in force for that version."""
        with self._lock:
            return dict(self._latest)

    def get(self, key: str, etag: str) -> Decision | None:
        """The decision in force for that version of the object."""
        with self._lock:
            return self._latest.get((key, etag))

    def decided_keys(self) -> set[str]:
        """Every key with a decision, on any version."""
        with self._lock:
            return set(self._by_key)

    def for_key(self, key: str) -> Decision | None:
        """The latest decision on ``key``, whatever version it was made on (compare its etag to see if it is stale)."""
        with self._lock:
            return self._by_key.get(key)


def current_decisions(dest: str | Location, current: pa.Table, endpoint_url: str | None = None) -> dict[str, Decision]:
    """key -> the decision in force for the object's current etag (stale decisions left out)."""
    latest = DecisionLog.open(dest, endpoint_url).latest()
    out = {}
    for key, etag in zip(current["key"].to_pylist(), current["etag"].to_pylist(), strict=True):
        if (decision := latest.get((key, etag))) is not None:
            out[key] = decision
    return out


def now() -> datetime:
    return datetime.now(UTC)
