"""``--release``: undo the scan's action on objects a reviewer overturned (``diffguard review``), and which objects a
review keeps out of ``--apply``.

A quarantined object is moved back the way quarantine moved it out, and never over anything:

1. a journal entry ``DEST/_release/<id>.json`` records the move before anything is copied;
2. the quarantine copy is read and checked against the bytes that were scored (size and sha256);
3. it is created at its original key exclusively (:meth:`Store.create`: an object written there since is never
   replaced; that release fails and says so);
4. the restored object is read back and compared with the copy; the row takes the etag of that same read, so what the
   row (and the overturn, bound to the sha256) names is exactly the bytes verified, never a write that came after;
   only then is the quarantine copy deleted, only if it is still the version that was verified;
5. the row is committed with ``quarantined_to`` cleared and the restored object's etag, and the journal entry is
   removed. The overturn needs no carrying over: it is bound to the bytes' sha256, which the restored object has.

A run that dies in between leaves the journal entry; the next run's :func:`recover_releases` finishes the move when
the restored object is verified, and forgets it otherwise (the object is still quarantined and still eligible).
A tagged object loses the ``moderation`` tag the scan set (its other tags are kept).

What DEST holds is read as untrusted: a row's ``quarantined_to`` and a journal's ``from`` are acted on only inside the
quarantine given with ``--quarantine``, and a key only inside SOURCE (:meth:`Location.holds`); anything else is
refused and reported, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from ..decisions import Decision, current_decisions
from ..errors import DiffguardError, InvalidInput, ObjectChanged, StorageError
from ..storage import Location, ObjectInfo, Store, sha256
from .state import PartWriter

log = logging.getLogger(__name__)

JOURNAL = "_release/"


@dataclass
class ReleaseReport:
    applied: bool
    eligible: int = 0  # overturned objects still quarantined or tagged
    done: int = 0
    failed: int = 0
    recovered: int = 0  # interrupted releases finished at the start of the run
    refused: int = 0  # journal entries naming something outside SOURCE and the quarantine, or other bytes: left alone


def overturned(dest: Location, current: pa.Table, endpoint_url: str | None) -> dict[str, Decision]:
    """key -> the overturn in force for the bytes the object's current row scored: the objects ``--apply`` leaves
    alone."""
    return {k: d for k, d in current_decisions(dest, current, endpoint_url).items() if d.decision == "overturn"}


def confirmed(dest: Location, current: pa.Table, endpoint_url: str | None) -> set[str]:
    """Keys a reviewer confirmed or relabelled for their current bytes: acted on like flagged objects."""
    return {k for k, d in current_decisions(dest, current, endpoint_url).items() if d.decision != "overturn"}


def _journal_key(dest: Location, key: str) -> str:
    return dest.key(JOURNAL + hashlib.sha1(key.encode()).hexdigest() + ".json")


def in_quarantine(url: Any, quarantine: Location | None) -> tuple[Store, str]:
    """The store and key of a quarantine copy that DEST names, only inside ``quarantine`` (else refused)."""
    key = quarantine.holds(url) if quarantine is not None and isinstance(url, str) else None
    if key is None:
        where = f"the quarantine {quarantine}" if quarantine is not None else "a quarantine (none given: --quarantine)"
        raise InvalidInput(f"{url!r} is not inside {where}: not released, nothing deleted")
    return quarantine.store, key  # type: ignore[union-attr]


def in_source(key: Any, source: Location) -> str:
    """A key DEST names, only inside SOURCE (else refused)."""
    if not isinstance(key, str) or not key.startswith(source.prefix) or key == source.prefix:
        raise InvalidInput(f"key {key!r} is not inside SOURCE {source}: nothing done")
    return key


def _restore(row: dict[str, Any], source: Location, quarantine: Location | None, dest: Location) -> ObjectInfo:
    """Move one quarantined object back to its key (steps 1-4 above); returns the restored object's info."""
    store, key = in_quarantine(row["quarantined_to"], quarantine)
    target = in_source(row["key"], source)
    if not row["sha256"]:
        raise StorageError(f"{row['quarantined_to']} has no sha256 of the bytes scored to verify it by; not released")
    entry = {"key": target, "from": row["quarantined_to"], "size": row["size"], "sha256": row["sha256"]}
    entry["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    dest.store.write(_journal_key(dest, target), json.dumps(entry).encode())
    data, copy_info = store.read(key)
    if len(data) != row["size"] or sha256(data) != row["sha256"]:
        raise StorageError(f"{row['quarantined_to']} does not hold the bytes that were scored; not released")
    source.store.create(target, data)  # exclusive: an object written there since is never replaced
    restored, info = source.store.read(target)  # the etag the row takes is this read's: of the bytes compared
    if restored != data:
        raise StorageError(f"{source.store.url(target)} does not match the quarantine copy; the copy is kept")
    store.delete(key, etag=copy_info.etag)
    return info


def release(
    apply: bool,
    current: pa.Table,
    source: Location,
    dest: Location,
    writer: PartWriter,
    endpoint_url: str | None,
    quarantine: Location | None = None,
) -> tuple[ReleaseReport, dict[str, str]]:
    """Release every overturned object still quarantined (inside ``quarantine``) or tagged. Returns the report and
    key -> restored etag."""
    report = ReleaseReport(apply)
    decisions = overturned(dest, current, endpoint_url)
    if not decisions:
        return report, {}
    rows = [
        (i, r)
        for i, r in enumerate(current.to_pylist())
        if r["key"] in decisions and (r["quarantined_to"] or r["tagged"])
    ]
    report.eligible = len(rows)
    if not apply:
        if rows:
            log.info("dry run: would release %d overturned objects (add --apply to act)", len(rows))
        return report, {}
    updates: dict[int, dict[str, Any]] = {}
    restored_etags: dict[str, str] = {}
    for i, row in rows:
        try:
            if row["quarantined_to"]:
                info = _restore(row, source, quarantine, dest)
                updates[i] = {
                    "quarantined_to": None,
                    "etag": info.etag,
                    "last_modified": info.last_modified,
                    "version_id": info.version_id,
                }
                restored_etags[row["key"]] = info.etag
            else:
                source.store.untag(in_source(row["key"], source), {"moderation": "nsfw"}, row["etag"])
                updates[i] = {"tagged": False}
        except (DiffguardError, OSError) as exc:
            report.failed += 1
            log.warning("could not release %s: %s", row["key"], exc)
    if updates:
        writer.commit(_with(current, updates))
        for i, row in rows:
            if i in updates and row["quarantined_to"]:
                dest.store.delete(_journal_key(dest, row["key"]))
    report.done = len(updates)
    return report, restored_etags


def _with(current: pa.Table, updates: dict[int, dict[str, Any]]) -> pa.Table:
    """The rows at the given indices with the given columns replaced."""
    indices = sorted(updates)
    table = current.take(pa.array(indices, pa.int64()))
    for column in sorted({c for u in updates.values() for c in u}):
        field = table.schema.field(column)
        values = [updates[j].get(column, table[column][n].as_py()) for n, j in enumerate(indices)]
        table = table.set_column(table.column_names.index(column), field, pa.array(values, field.type))
    return table


def recover_releases(
    dest: Location,
    source: Location,
    current: pa.Table,
    writer: PartWriter,
    apply: bool,
    quarantine: Location | None,
) -> tuple[int, int]:
    """Finish releases a killed run left in the journal (the restored object verified), forget the rest. An entry
    naming a key outside SOURCE, a copy outside ``quarantine``, or bytes other than the row's is refused: reported and
    kept, nothing deleted. Returns (finished, refused)."""
    journal = list(dest.store.list(dest.key(JOURNAL)))
    if not journal:
        return 0, 0
    index = {k: i for i, k in enumerate(current["key"].to_pylist())}
    updates: dict[int, dict[str, Any]] = {}
    refused = 0
    for info in journal:
        try:
            entry = json.loads(dest.store.read(info.key)[0])
            key = in_source(entry.get("key"), source)
            row = index.get(key)
            digest = entry.get("sha256")
            if row is None or not digest or current["sha256"][row].as_py() != digest:
                raise InvalidInput(f"{key!r}: no scan row with the sha256 the entry names; nothing done")
            try:
                restored, seen = source.store.read(key)
            except (ObjectChanged, StorageError):
                restored, seen = None, None
            if seen is not None and sha256(restored) == digest:  # type: ignore[arg-type]
                if not apply:
                    continue
                store, copy_key = in_quarantine(entry.get("from"), quarantine)
                _delete_copy(store, copy_key, digest)
                updates[row] = {"quarantined_to": None, "etag": seen.etag, "last_modified": seen.last_modified}
                updates[row]["version_id"] = seen.version_id
                log.info("finished an interrupted release: %s -> %s", entry["from"], key)
        except (DiffguardError, ValueError, TypeError, AttributeError) as exc:
            refused += 1
            log.warning("WARNING: refused the release journal entry %s: %s", dest.store.url(info.key), exc)
            continue
        dest.store.delete(info.key)
    if updates:
        writer.commit(_with(current, updates))
    return len(updates), refused


def _delete_copy(store: Store, key: str, digest: str) -> None:
    """Delete a quarantine copy only while it still holds the bytes with ``digest`` (compare, then delete that etag:
    a write between the two makes the delete fail rather than remove other bytes)."""
    if store.head(key) is None:
        return  # already gone: an earlier attempt deleted it
    data, info = store.read(key)
    if sha256(data) != digest:
        raise ObjectChanged(f"{store.url(key)} does not hold the bytes released: not deleted")
    store.delete(key, etag=info.etag)
