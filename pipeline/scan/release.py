"""``--release``: undo the scan's action on objects a reviewer overturned (``diffguard review``), and which objects a
review keeps out of ``--apply``.

A quarantined object is moved back the way quarantine moved it out, and never over anything:

1. a journal entry ``DEST/_release/<id>.json`` records the move before anything is copied;
2. the quarantine copy is read and checked against the bytes that were scored (size and sha256);
3. it is created at its original key exclusively (:meth:`Store.create`: an object written there since is never
   replaced; that release fails and says so);
4. the restored object is verified (size and sha256), and only then is the quarantine copy deleted, only if it is
   still the version that was verified;
5. the row is committed with ``quarantined_to`` cleared and the restored object's etag, the overturn is carried over to
   that etag (a new local file has a new etag), and the journal entry is removed.

A run that dies in between leaves the journal entry; the next run's :func:`recover_releases` finishes the move when
the restored object is verified, and forgets it otherwise (the object is still quarantined and still eligible).
A tagged object loses the ``moderation`` tag the scan set (its other tags are kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from ..decisions import Decision, DecisionLog, current_decisions
from ..errors import DiffguardError, InvalidInput, StorageError
from ..storage import Location, ObjectInfo, object_store, sha256
from .state import PartWriter

log = logging.getLogger(__name__)

JOURNAL = "_release/"
RELEASER = "diffguard scan --release"  # the reviewer named on decisions carried over to a restored object's etag


@dataclass
class ReleaseReport:
    applied: bool
    eligible: int = 0  # overturned objects still quarantined or tagged
    done: int = 0
    failed: int = 0
    recovered: int = 0  # interrupted releases finished at the start of the run


def overturned(dest: Location, current: pa.Table, endpoint_url: str | None) -> dict[str, Decision]:
    """key -> the overturn in force for the object's current etag: the objects ``--apply`` leaves alone."""
    return {k: d for k, d in current_decisions(dest, current, endpoint_url).items() if d.decision == "overturn"}


def confirmed(dest: Location, current: pa.Table, endpoint_url: str | None) -> set[str]:
    """Keys a reviewer confirmed or relabelled for their current etag: acted on like flagged objects."""
    return {k for k, d in current_decisions(dest, current, endpoint_url).items() if d.decision != "overturn"}


def _journal_key(dest: Location, key: str) -> str:
    return dest.key(JOURNAL + hashlib.sha1(key.encode()).hexdigest() + ".json")


def _restore(row: dict[str, Any], source: Location, dest: Location, endpoint_url: str | None) -> ObjectInfo:
    """Move one quarantined object back to its key (steps 1-4 above); returns the restored object's info."""
    store, key = object_store(row["quarantined_to"], endpoint_url)
    entry = {"key": row["key"], "from": row["quarantined_to"], "size": row["size"], "sha256": row["sha256"]}
    entry["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    dest.store.write(_journal_key(dest, row["key"]), json.dumps(entry).encode())
    data, copy_info = store.read(key)
    if len(data) != row["size"] or (row["sha256"] and sha256(data) != row["sha256"]):
        raise StorageError(f"{row['quarantined_to']} does not hold the bytes that were scored; not released")
    source.store.create(row["key"], data)  # exclusive: an object written there since is never replaced
    restored, _ = source.store.read(row["key"])
    if restored != data:
        raise StorageError(f"{source.store.url(row['key'])} does not match the quarantine copy; the copy is kept")
    info = source.store.head(row["key"])
    if info is None:
        raise StorageError(f"{source.store.url(row['key'])} vanished after it was restored; the copy is kept")
    store.delete(key, etag=copy_info.etag)
    return info


def release(
    apply: bool,
    current: pa.Table,
    source: Location,
    dest: Location,
    writer: PartWriter,
    endpoint_url: str | None,
) -> tuple[ReleaseReport, dict[str, str]]:
    """Release every overturned object still quarantined or tagged. Returns the report and key -> restored etag."""
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
    carried: list[Decision] = []
    restored_etags: dict[str, str] = {}
    for i, row in rows:
        try:
            if row["quarantined_to"]:
                info = _restore(row, source, dest, endpoint_url)
                updates[i] = {
                    "quarantined_to": None,
                    "etag": info.etag,
                    "last_modified": info.last_modified,
                    "version_id": info.version_id,
                }
                restored_etags[row["key"]] = info.etag
                if info.etag != row["etag"]:
                    old = decisions[row["key"]]
                    note = f"carried over from etag {old.etag} on release"
                    carried.append(Decision(**{**old.__dict__, "etag": info.etag, "reviewer": RELEASER, "note": note}))
            else:
                untag = getattr(source.store, "untag", None)
                if untag is None:
                    raise InvalidInput(f"{source.store.url()} has no object tags to remove")
                untag(row["key"], {"moderation": "nsfw"}, row["etag"])
                updates[i] = {"tagged": False}
        except (DiffguardError, OSError) as exc:
            report.failed += 1
            log.warning("could not release %s: %s", row["key"], exc)
    if carried:
        DecisionLog(dest).append(carried)  # before the row names the new etag: the overturn is never lost
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
    dest: Location, source: Location, current: pa.Table, writer: PartWriter, apply: bool, endpoint_url: str | None
) -> int:
    """Finish releases a killed run left in the journal (the restored object verified), forget the rest."""
    journal = list(dest.store.list(dest.key(JOURNAL)))
    if not journal:
        return 0
    index = {k: i for i, k in enumerate(current["key"].to_pylist())}
    updates: dict[int, dict[str, Any]] = {}
    for info in journal:
        entry = json.loads(dest.store.read(info.key)[0])
        restored = source.store.head(entry["key"])
        verified = False
        if restored is not None and restored.size == entry["size"]:
            verified = not entry["sha256"] or sha256(source.store.read(entry["key"])[0]) == entry["sha256"]
        if verified:
            if not apply:
                continue
            store, key = object_store(entry["from"], endpoint_url)
            try:
                store.delete(key)
            except DiffguardError as exc:
                log.warning("released %s but could not delete its copy %s: %s", entry["key"], entry["from"], exc)
                continue
            if (i := index.get(entry["key"])) is not None:
                updates[i] = {"quarantined_to": None, "etag": restored.etag, "last_modified": restored.last_modified}  # type: ignore[union-attr]
            log.info("finished an interrupted release: %s -> %s", entry["from"], entry["key"])
        dest.store.delete(info.key)
    if updates:
        writer.commit(_with(current, updates))
    return len(updates)
