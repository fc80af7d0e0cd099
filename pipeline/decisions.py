"""Review decisions: an append-only, journalled Parquet table under the scan's DEST.

```
DEST/_review/decisions/part-<decided_at_ns>-<random>.parquet     one file per acknowledged decision (or batch)
```

Every file is created exclusively and whole (:meth:`Store.create`: locally a hard link of a complete, fsynced temp file;
on S3 a PUT with ``If-None-Match: *``), so a decision is acknowledged only once it is durable, a reader never sees half
a file, and no decision ever replaces another.

A decision is bound to the bytes the reviewer was shown: their ``sha256``, which the review app checked against the
scan row's before it showed a pixel or recorded the decision. It is in force only for an object whose scored bytes
have that sha256 (the latest decision per ``(key, sha256)`` wins, by ``decided_at``, then file name), so an object
swapped after the review is never exempt, and one swapped back is exempt only if those are the bytes the reviewer saw.
A decision that does not match the object's current bytes is **stale**. Decisions attach to the bytes, not to the
model fingerprint: rescoring keeps them. Decisions written before they carried a sha256 are matched by etag, and their
overturns are no longer honoured (an S3 ETag repeats when the same bytes are uploaded again): review those again.

The files are read as untrusted (anyone who can write under DEST can write one): a file that cannot be read, or a row
outside the schema, is skipped with a warning naming it; a ``decided_at`` more than :data:`FUTURE_SKEW` ahead of this
clock is skipped too (it would otherwise win over every later decision).
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
FUTURE_SKEW = timedelta(minutes=5)  # a decided_at further ahead of this clock is not believed

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
        ("sha256", pa.string()),  # of the bytes reviewed (the scan row's, checked against the object when shown)
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
    sha256: str | None = None  # None: written before decisions were bound to bytes (matched by etag; overturns ignored)

    def binding(self) -> tuple[str, str]:
        """(key, what it is bound to): ``sha256:<hex>``, or ``etag:<etag>`` for a decision without one."""
        return self.key, f"sha256:{self.sha256}" if self.sha256 else f"etag:{self.etag}"

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
    >>> log.append([Decision("a.png", "9f…", None, "overturn", None, "a beach", "ana", now(), sha256="e3b0…")])
    >>> log.get("a.png", sha256="e3b0…").decision
    'overturn'
    """

    def __init__(self, dest: Location):
        self.dest = dest
        self._lock = threading.Lock()
        self._all: list[Decision] = []
        self._latest: dict[tuple[str, str], Decision] = {}  # Decision.binding() -> the latest decision
        self._by_key: dict[str, Decision] = {}  # the latest decision on each key, whatever its bytes
        for decision in self._read():
            self._remember(decision)

    @classmethod
    def open(cls, dest: str | Location, endpoint_url: str | None = None) -> DecisionLog:
        return cls(parse_location(dest, endpoint_url, "DEST") if isinstance(dest, str) else dest)

    def _read(self) -> list[Decision]:
        rows: list[tuple[datetime, str, int, Decision]] = []
        horizon = now() + FUTURE_SKEW
        for info in self.dest.store.list(self.dest.key(PREFIX)):
            name = info.key.rsplit("/", 1)[-1]
            if not (name.startswith("part-") and name.endswith(".parquet")):
                continue  # temp files of a write in flight are never read
            url = self.dest.store.url(info.key)
            try:
                data, _ = self.dest.store.read(info.key)
                found = pq.read_table(io.BytesIO(data)).to_pylist()
            except (pa.ArrowInvalid, OSError, StorageError) as exc:
                log.warning("WARNING: skipped %s: not a readable decisions file (%s)", url, exc)
                continue
            for i, row in enumerate(found):
                if (problem := _problem(row, horizon)) is not None:
                    log.warning("WARNING: skipped row %d of %s: %s", i, url, problem)
                    continue
                rows.append((row["decided_at"], name, i, Decision(**{f: row.get(f) for f in SCHEMA.names})))
        rows.sort(key=lambda r: r[:3])
        return [decision for *_, decision in rows]

    def _remember(self, decision: Decision) -> None:
        self._all.append(decision)
        pair = decision.binding()
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
        """:meth:`Decision.binding` -> the latest decision bound to those bytes (or that etag)."""
        with self._lock:
            return dict(self._latest)

    def get(self, key: str, sha256: str | None = None, etag: str | None = None) -> Decision | None:
        """The decision in force for the object ``key`` whose scored bytes have ``sha256``: the latest bound to them,
        else a confirm or relabel made (before decisions were bound to bytes) on the version with ``etag``."""
        with self._lock:
            if sha256 and (bound := self._latest.get((key, f"sha256:{sha256}"))) is not None:
                return bound
            legacy = self._latest.get((key, f"etag:{etag}")) if etag else None
            return legacy if legacy is not None and legacy.decision != "overturn" else None

    def decided_keys(self) -> set[str]:
        """Every key with a decision, on any version."""
        with self._lock:
            return set(self._by_key)

    def for_key(self, key: str) -> Decision | None:
        """The latest decision on ``key``, whatever bytes it was made on (:meth:`get` says whether it is in force)."""
        with self._lock:
            return self._by_key.get(key)


def current_decisions(dest: str | Location, current: pa.Table, endpoint_url: str | None = None) -> dict[str, Decision]:
    """key -> the decision in force for the bytes each current row scored (stale decisions left out)."""
    decisions = DecisionLog.open(dest, endpoint_url)
    out = {}
    columns = (current[c].to_pylist() for c in ("key", "sha256", "etag"))
    for key, digest, etag in zip(*columns, strict=True):
        if (decision := decisions.get(key, digest, etag)) is not None:
            out[key] = decision
    return out


def _problem(row: dict[str, Any], horizon: datetime) -> str | None:
    """Why a row read from a decisions file is not a decision to believe (None: it is)."""
    if not isinstance(row.get("key"), str) or not isinstance(row.get("etag"), str):
        return f"key and etag must be strings, got {row.get('key')!r} and {row.get('etag')!r}"
    if row.get("decision") not in DECISIONS:
        return f"decision: got {row.get('decision')!r}; allowed: {', '.join(DECISIONS)}"
    if not isinstance(row.get("reviewer"), str) or not isinstance(row.get("decided_at"), datetime):
        return f"reviewer and decided_at are required, got {row.get('reviewer')!r} and {row.get('decided_at')!r}"
    if row["decided_at"].tzinfo is None:
        return "decided_at has no time zone"
    if row["decided_at"] > horizon:
        return f"decided_at {row['decided_at'].isoformat()} is in the future (more than {FUTURE_SKEW} ahead)"
    digest = row.get("sha256")
    if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
        return f"sha256: got {digest!r}; allowed: 64 hex digits"
    return None


def now() -> datetime:
    return datetime.now(UTC)
