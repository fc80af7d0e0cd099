"""What a scan does to flagged objects: ``--quarantine`` (copy, verify, delete) or ``--tag``; dry run unless --apply.

Actions follow the current view, not just this run's rows: every flagged object whose action has not been applied
yet is eligible, so ``--apply`` after a dry run acts without rescoring. Each action is idempotent.

No object is ever lost by a quarantine move:

1. a journal entry ``DEST/_quarantine/<id>.json`` records the move before anything is copied;
2. the object is copied: only the scanned version (a read pinned to it), written with an exclusive create;
3. the copy is verified: its size and sha256 must equal those of the bytes that were scored;
4. only then is the original deleted, and only if it still has the scanned etag;
5. the row update (``quarantined_to``) is committed, then the journal entry is removed.

A run that dies anywhere in between leaves the original, the copy or both, plus the journal entry; the next run's
:func:`recover` finishes the move (deleting only with ``--apply``) or records it, and forgets moves that never copied.

No quarantine write replaces anything: copies are exclusive creates (:meth:`Store.create`). In a local quarantine
directory an object goes to the path its key names when that key names exactly one path (:func:`local_name`);
any other key (``a//b.png``, ``./c.png``, ``d/``, ``..``, NUL, non-NFC Unicode, ``%``) is stored as one file at the
quarantine's top level, ``%`` + the percent-encoded key, so two keys never share a file. A key whose path is taken
by a folder or crosses a file (``f`` and ``f/g.png``) falls back to the same encoded name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DiffguardError, InvalidInput, ObjectChanged
from ..storage import (
    LocalStore,
    Location,
    ObjectExists,
    S3Store,
    StorageError,
    Store,
    Version,
    canonical_key,
    parse_location,
    sha256,
)
from .state import PartWriter

log = logging.getLogger(__name__)

TAGS = {"moderation": "nsfw"}
JOURNAL = "_quarantine/"
WORKERS = 8  # objects acted on concurrently
ENCODED_MAX = 200  # characters of an encoded name kept before it is shortened with the key's hash (NAME_MAX is 255)


@dataclass
class ActionReport:
    action: str | None  # "quarantine" | "tag" | None
    applied: bool  # False: dry run
    eligible: int = 0  # flagged objects the action has not been applied to yet
    done: int = 0
    failed: int = 0
    recovered: int = 0  # interrupted quarantine moves finished or recorded at the start of the run
    pending: int = 0  # interrupted moves whose original still exists, left for an --apply run
    refused: int = 0  # journal entries naming something outside SOURCE and the quarantine, or other bytes


def quarantine_location(text: str, source: Location, endpoint_url: str | None) -> Location:
    """``s3://bucket/prefix``; a filesystem path (absolute, or starting with ``./``, ``../`` or ``~``) is a local
    directory whatever the source; any other text is, for an S3 source, a prefix in the source's bucket, and
    otherwise a local directory."""
    path_like = text.startswith(("/", "./", "../", "~")) or text in (".", "..")
    if text.startswith("s3://") or path_like or not isinstance(source.store, S3Store):
        return parse_location(text, endpoint_url, "--quarantine")
    prefix = text.strip("/")
    return Location(source.store, prefix + "/" if prefix else "")


def encoded_name(key: str) -> str:
    """One file name for any key: '%' + the key percent-encoded (every byte but ASCII letters, digits and ``_.-~``),
    so distinct keys give distinct names, none of which a plain key can take (plain keys hold no '%'). Names longer
    than ENCODED_MAX keep their start and end in the key's sha256."""
    name = "%" + quote(key, safe="")
    if len(name) > ENCODED_MAX:
        name = f"{name[: ENCODED_MAX - 66]}%~{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"
    return name


def local_name(key: str) -> str | None:
    """The path a key names in a local quarantine when it names exactly one (else None: use :func:`encoded_name`)."""
    plain = canonical_key(key) and "%" not in key and key == unicodedata.normalize("NFC", key)
    return key if plain and all(ord(c) >= 32 and len(p.encode()) <= 255 for p in key.split("/") for c in p) else None


def _verified(store: Store, key: str, size: int, digest: str) -> bool:
    """True when ``key`` exists with exactly ``size`` bytes whose sha256 is ``digest``."""
    info = store.head(key)
    if info is None or info.size != size:
        return False
    data, _ = store.read(key)
    return len(data) == size and sha256(data) == digest


def _candidates(quarantine: Location, row: dict[str, Any]) -> list[str]:
    """Where the object may go, in order: its key's own name, then names no other object can claim."""
    digest = (row.get("sha256") or "")[:12]
    if isinstance(quarantine.store, LocalStore):
        plain = local_name(row["key"])
        names = [plain] if plain is not None else []
        names.append(encoded_name(row["key"]))
    else:
        names = [row["key"]]
    out = []
    for name in names:
        key = quarantine.key(name)
        stem, ext = posixpath.splitext(key)
        out += [key, f"{stem}.{digest}{ext}"] if digest else [key]
    return out


def _targets(quarantine: Location, row: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    """Names the object may go to, each with whether an identical copy is already there; never a name holding
    different bytes."""
    for candidate in _candidates(quarantine, row):
        try:
            info = quarantine.store.head(candidate)
        except (OSError, InvalidInput):
            continue  # the name crosses a file, or is too long: the next one
        if info is None:
            yield candidate, False
        elif _verified(quarantine.store, candidate, row["size"], row["sha256"]):
            yield candidate, True


def _copied(source: Location, row: dict[str, Any], quarantine: Location, dst_key: str) -> bool:
    """Copy exclusively. False when the name was taken meanwhile (by another object, or a folder); True when the
    copy is there, including one an earlier attempt wrote (a write whose answer was lost)."""
    try:
        source.store.copy(row["key"], quarantine.store, dst_key, row["etag"])
    except ObjectExists:
        return _verified(quarantine.store, dst_key, row["size"], row["sha256"])
    return True


def _journal_key(dest: Location, key: str) -> str:
    return dest.key(JOURNAL + hashlib.sha1(key.encode()).hexdigest() + ".json")


def _store_ref(store: Store) -> dict[str, str]:
    if isinstance(store, S3Store):
        return {"kind": "s3", "bucket": store.bucket}
    return {"kind": "local", "root": store.root}  # type: ignore[attr-defined]


def _store_from(ref: dict[str, str], endpoint_url: str | None) -> Store:
    return S3Store(ref["bucket"], endpoint_url) if ref["kind"] == "s3" else LocalStore(ref["root"])


def move(row: dict[str, Any], source: Location, quarantine: Location, dest: Location) -> str:
    """Quarantine one object (steps 1-4 above); returns where it now is."""
    if not row.get("sha256"):  # withheld unread (over --max-object-bytes): checksum the scanned version now
        data, _ = source.store.read(row["key"], Version(row["etag"]))
        row = {**row, "sha256": sha256(data), "size": len(data)}
        del data
    for dst_key, present in _targets(quarantine, row):
        entry = {
            "key": row["key"],
            "etag": row["etag"],
            "size": row["size"],
            "sha256": row["sha256"],
            "dst": {**_store_ref(quarantine.store), "key": dst_key},
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        dest.store.write(_journal_key(dest, row["key"]), json.dumps(entry).encode())
        if present or _copied(source, row, quarantine, dst_key):
            break
    else:
        first = quarantine.store.url(_candidates(quarantine, row)[0])
        raise StorageError(f"{first} and its alternatives hold other objects; not overwritten, original kept")
    if not _verified(quarantine.store, dst_key, row["size"], row["sha256"]):
        raise StorageError(f"copy at {quarantine.store.url(dst_key)} does not match the original; original kept")
    source.store.delete(row["key"], etag=row["etag"])
    return quarantine.store.url(dst_key)


def _updated(current: pa.Table, rows: dict[int, Any], column: str) -> pa.Table:
    """The rows at the given indices of ``current`` with ``column`` set to the given values (all columns kept)."""
    indices = sorted(rows)
    table = current.take(indices)
    i = table.column_names.index(column)
    values = pa.array([rows[j] for j in indices], table.schema.field(column).type)
    return table.set_column(i, table.schema.field(column), values)


def recover(
    dest: Location,
    source: Location,
    quarantine: Location | None,
    current: pa.Table,
    writer: PartWriter,
    apply: bool,
    endpoint_url: str | None,
) -> tuple[int, int, int]:
    """Finish or forget quarantine moves a killed run left in the journal. Returns (recovered, pending, refused).

    The journal is under DEST and read as untrusted: an entry is acted on only for a key inside SOURCE whose current
    row has the sha256 the entry names and a copy holding those bytes. Recording a move whose original is already gone
    deletes nothing; deleting the original needs the copy inside ``quarantine`` and an original that still holds the
    bytes (compared, then deleted only at the etag compared: a write in between makes the delete fail). Anything else
    is refused: reported and kept, nothing deleted."""
    journal = list(dest.store.list(dest.key(JOURNAL)))
    if not journal:
        return 0, 0, 0
    index = {k: i for i, k in enumerate(current["key"].to_pylist())}
    done: dict[int, str] = {}
    resolved: list[str] = []
    pending = refused = 0
    for info in journal:
        try:
            entry = json.loads(dest.store.read(info.key)[0])
            key, digest, row = _bounded(entry, source, index, current)
            dst_store, dst_key = _store_from(entry["dst"], endpoint_url), entry["dst"]["key"]
            dst_url = dst_store.url(dst_key)
            original = source.store.head(key)
            copied = _verified(dst_store, dst_key, entry["size"], digest)
        except (DiffguardError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            refused += 1
            log.warning("WARNING: refused the quarantine journal entry %s: %s", dest.store.url(info.key), exc)
            continue
        if copied and (original is None or original.etag == entry["etag"]):
            if original is not None:
                if quarantine is None or quarantine.holds(dst_url) is None:
                    refused += 1
                    where = f"the quarantine {quarantine}" if quarantine is not None else "a quarantine (none given)"
                    log.warning(
                        "WARNING: refused the quarantine journal entry %s: its copy %s is not inside %s; %s kept",
                        dest.store.url(info.key),
                        dst_url,
                        where,
                        key,
                    )
                    continue
                if not apply:
                    pending += 1
                    log.warning("an interrupted quarantine of %s is pending: rerun with --apply", key)
                    continue
                try:
                    data, seen = source.store.read(key, Version(entry["etag"]))
                    if sha256(data) != digest:
                        raise ObjectChanged(f"{source.store.url(key)} does not hold the bytes the entry names")
                    source.store.delete(key, etag=seen.etag)
                except DiffguardError as exc:
                    refused += 1
                    log.warning("WARNING: refused the quarantine journal entry %s: %s", dest.store.url(info.key), exc)
                    continue
            if current["etag"][row].as_py() == entry["etag"]:
                done[row] = dst_url
            log.info("finished an interrupted quarantine: %s -> %s", key, dst_url)
        elif original is None:
            log.warning("%s is gone and no verified copy is at %s", key, dst_url)
        resolved.append(info.key)
    if done:
        writer.commit(_updated(current, done, "quarantined_to"))
    for key in resolved:
        dest.store.delete(key)
    return len(done), pending, refused


def _bounded(entry: dict[str, Any], source: Location, index: dict[str, int], current: pa.Table) -> tuple[str, str, int]:
    """(key, sha256, row) of a journal entry that names a key inside SOURCE with a row of the bytes it names."""
    key, digest = entry.get("key"), entry.get("sha256")
    if not isinstance(key, str) or not key.startswith(source.prefix) or key == source.prefix:
        raise InvalidInput(f"key {key!r} is not inside SOURCE {source}")
    row = index.get(key)
    if not digest or row is None or current["sha256"][row].as_py() != digest:
        raise InvalidInput(f"{key!r} has no scan row with the sha256 the entry names ({digest!r})")
    return key, digest, row


def eligible(
    current: pa.Table, listed: dict[str, str] | pa.Table, action: str, decisions: dict[str, str] | None = None
) -> list[int]:
    """Rows of flagged objects (the policy withholds them, or they could not be scored) still present with the scanned
    etag, not yet acted on. ``listed``: the listing's key and etag (a table with those columns, or key -> etag).
    ``decisions`` (key -> the review decision in force for the current etag): an ``overturn`` is never acted on;
    ``confirm`` and ``relabel`` are acted on as flagged objects are, even a reported one. Columnar: only the
    candidates' rows become Python values."""
    decisions = decisions or {}
    if isinstance(listed, dict):
        listed = pa.table({"key": pa.array(list(listed), pa.string()), "etag": pa.array(list(listed.values()))})

    def keys(kinds: tuple[str, ...]) -> pa.Array:
        return pa.array(sorted(k for k, d in decisions.items() if d in kinds), pa.string())

    if action == "quarantine":
        pending = pc.is_null(current["quarantined_to"])
    else:
        pending = pc.invert(pc.fill_null(current["tagged"], False))
    flagged = pc.and_(
        pc.fill_null(current["flagged"], False), pc.invert(pc.is_in(current["key"], value_set=keys(("overturn",))))
    )
    withheld = pc.or_(flagged, pc.is_in(current["key"], value_set=keys(("confirm", "relabel"))))
    rows = pc.indices_nonzero(pc.and_(withheld, pending))  # scored and withheld, or unscorable (never a read error)
    if len(rows) == 0:
        return []
    candidates = current.select(["key", "etag"]).take(rows).append_column("_row", rows)
    present = candidates.join(listed.select(["key", "etag"]), keys=["key", "etag"], join_type="inner")
    return sorted(present["_row"].to_pylist())


def apply_actions(
    action: str | None,
    apply: bool,
    current: pa.Table,
    listed: dict[str, str],
    source: Location,
    quarantine: Location | None,
    dest: Location,
    writer: PartWriter,
    decisions: dict[str, str] | None = None,
) -> ActionReport:
    report = ActionReport(action, apply)
    if action is None:
        return report
    if action == "quarantine" and quarantine is None:
        raise InvalidInput("the quarantine action needs a quarantine location")
    rows = eligible(current, listed, action, decisions)
    report.eligible = len(rows)
    if not apply:  # the driver reports the run's total
        return report

    def act(i: int) -> Any:
        row = {c: current[c][i].as_py() for c in ("key", "etag", "size", "sha256")}
        if action == "quarantine":
            return move(row, source, quarantine, dest)  # type: ignore[arg-type]
        source.store.tag(row["key"], TAGS, row["etag"])
        return True

    results: dict[int, Any] = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        for i, outcome in zip(rows, pool.map(_safely(act), rows), strict=True):
            if isinstance(outcome, DiffguardError):
                report.failed += 1
                log.warning("could not %s %s: %s", action, current["key"][i].as_py(), outcome)
            else:
                results[i] = outcome
    report.done = len(results)
    if results:
        writer.commit(_updated(current, results, "quarantined_to" if action == "quarantine" else "tagged"))
        if action == "quarantine":
            for i in results:
                dest.store.delete(_journal_key(dest, current["key"][i].as_py()))
    return report


def _safely(fn: Callable[[int], Any]) -> Callable[[int], Any]:
    """Per-object storage failures become that object's outcome; anything else still stops the run."""

    def wrapped(i: int) -> Any:
        try:
            return fn(i)
        except (StorageError, InvalidInput) as exc:
            return exc
        except (OSError, ValueError) as exc:  # a key the filesystem cannot take: this object's failure, not the run's
            return StorageError(f"{type(exc).__name__}: {exc}")

    return wrapped
