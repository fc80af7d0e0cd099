"""The scan's plan and commit cut into shards by a hash of the key, so that no process holds more than one shard.

The listing and the current view are split by :func:`shard_ids` into ``S`` shards (:func:`shard_count`: about
:data:`SHARD_ROWS` objects each, a power of two). Shard ``s`` of the listing meets shard ``s`` of the current view in
one task, which plans it (:func:`plan_shard`: what to read) and, after scoring, finishes it (:func:`finish_shard`:
actions on its flagged objects, then its new slice of the table written as one file). The driver then commits the
new files, by name, in one Delta commit. The table keeps one file per shard
(``results/shard-00003-of-00016-r000008.zstd.parquet``), so a run rewrites only the shards in which something
changed and a run in which nothing changed commits no file at all (the run number alone).

Work goes through a :class:`Runner`: here every call runs in this process (small scans, and the tests of this
module); :class:`pipeline.scan.job.RayRunner` runs the same functions as Ray tasks whose results stay in the object
store, so the driver holds object references and counts, never rows.

A shard's current view is its slice of the table plus its slice of every staged part of a later run, the latest row
per key (:func:`pipeline.scan.state.latest_per_key`): the same rows :func:`pipeline.scan.state.load_state` reads.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..images import DecodeLimits
from ..storage import Location, StorageError
from .actions import ActionReport, apply_actions
from .plan import _CURRENT, LISTING_SCHEMA, SHARD_ROWS, named_image, plan
from .state import (
    ROW_SCHEMA,
    WorkerParts,
    _read_parquet,
    conform,
    latest_per_key,
)
from .table import TABLE

log = logging.getLogger("diffguard")

LOCAL_ROWS = 100_000  # a scan of at most this many objects (listed or recorded) plans in the driver, without Ray
_SHARD_FILE = re.compile(r"^shard-(\d{5})-of-(\d{5})-r\d{6,}\.zstd\.parquet$")
PLAN_COLUMNS = [*_CURRENT, "flagged", "quarantined_to", "tagged"]
KEY_ETAG = pa.schema([("key", pa.string()), ("etag", pa.string())])
_MIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))  # murmur3's finaliser
_PRIME = np.uint64(1099511628211)  # FNV's 64-bit prime
_HASH_ROWS = 1 << 16  # keys hashed at a time (bounds the temporaries)


def shard_count(rows: int, current: int = 1, per_shard: int | None = None) -> int:
    """Shards for ``rows`` objects: a power of two, about ``per_shard`` (:data:`SHARD_ROWS`) each; never fewer than
    ``current`` (a table shrinks without being rewritten)."""
    n = max(1, -(-rows // (per_shard or SHARD_ROWS)))
    return max(1 << (n - 1).bit_length(), current)


def _hash(keys: pa.Array) -> np.ndarray:
    """A 64-bit hash of each key's UTF-8 bytes, the same in every process and on every machine."""
    keys = keys.cast(pa.large_string())
    if keys.null_count:
        raise ValueError("object keys are never null")
    offsets = np.frombuffer(keys.buffers()[1], np.int64)[keys.offset : keys.offset + len(keys) + 1]
    data = keys.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    starts, lengths = offsets[:-1] - lo, np.diff(offsets)
    powers = np.cumprod(np.full(max(int(lengths.max(initial=0)), 1), _PRIME, np.uint64))
    position = np.arange(hi - lo, dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        sums = np.zeros(hi - lo + 1, np.uint64)
        np.cumsum(raw[lo:hi].astype(np.uint64) * powers[position], out=sums[1:])
        h = sums[starts + lengths] - sums[starts] + lengths.astype(np.uint64)
        h ^= h >> np.uint64(33)
        h *= _MIX[0]
        h ^= h >> np.uint64(33)
        h *= _MIX[1]
        h ^= h >> np.uint64(33)
    return h


def shard_ids(keys: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """The shard (0 .. shards - 1) of each key."""
    if shards == 1:
        return np.zeros(len(keys), np.int64)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks else pa.array([], pa.string())
    parts = [_hash(keys.slice(i, _HASH_ROWS)) for i in range(0, len(keys), _HASH_ROWS)]
    h = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    return (h % np.uint64(shards)).astype(np.int64)


def split(table: pa.Table, shards: int) -> pa.Table | list[pa.Table]:
    """The table's rows by shard (in their order within each): a list of ``shards`` tables, or the table itself
    when there is one shard (what a task with one return value returns)."""
    if shards == 1:
        return table
    ids = shard_ids(table["key"], shards)
    order = np.argsort(ids, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=shards))])
    return [table.take(order[bounds[s] : bounds[s + 1]]) for s in range(shards)]


def split_pieces(shards: int, *pieces: pa.Table) -> list[pa.Table]:
    """Listing pieces, concatenated and split by shard (a task with ``shards`` return values)."""
    tables = [p for p in pieces if p.num_rows]
    return split(pa.concat_tables(tables) if tables else pieces[0], shards)  # type: ignore[return-value]


@dataclass(frozen=True)
class TableFile:
    """A data file of the Delta table (or any Parquet file under DEST), read where it is used."""

    dest: Location
    rel: str  # relative to DEST

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The file's rows, decoding only ``columns`` (those an older file lacks come back as nulls)."""
        data, _ = self.dest.store.read(self.dest.key(self.rel))
        try:
            file = pq.ParquetFile(io.BytesIO(data))
            names = set(file.schema_arrow.names)
            table = file.read(columns=None if columns is None else [c for c in columns if c in names])
        except (pa.ArrowInvalid, OSError) as exc:
            url = self.dest.store.url(self.dest.key(self.rel))
            raise StorageError(f"{url} is not a readable Parquet file: {exc}") from None
        return _project(table, columns)


def _project(table: pa.Table, columns: Sequence[str] | None) -> pa.Table:
    table = conform(table)
    return table if columns is None else table.select(list(columns))


def read_split(dest: Location, rels: list[str], shards: int, columns: list[str] | None) -> pa.Table | list[pa.Table]:
    """Parquet files under DEST, concatenated in order and split by shard (a task over table files or staged parts)."""
    tables = [_project(_read_parquet(dest, rel), columns) for rel in rels]
    table = pa.concat_tables(tables, promote_options="default") if tables else _empty(columns)
    return split(table, shards)


def _empty(columns: Sequence[str] | None) -> pa.Table:
    return _project(ROW_SCHEMA.empty_table(), columns)


def current_of(pieces: Sequence[pa.Table | TableFile], columns: Sequence[str] | None = None) -> pa.Table:
    """A shard's current view from its pieces in commit order (table first, then staged parts): latest row per key."""
    whole = len(pieces) == 1 and isinstance(pieces[0], TableFile)  # one shard file: one row per key already
    tables = [p.read(columns) if isinstance(p, TableFile) else _project(p, columns) for p in pieces]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return _empty(columns)
    current = tables[0] if whole else latest_per_key(tables)
    return current if columns is None else current.select(list(columns))


def _listing(pieces: Sequence[pa.Table]) -> pa.Table:
    tables = [p.cast(LISTING_SCHEMA) for p in pieces if p.num_rows]
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


@dataclass(frozen=True)
class PlanSpec:
    fingerprint: str
    limits: DecodeLimits
    full: bool
    action: str | None  # "quarantine" | "tag" | None: count the shard's flagged rows not yet acted on


def plan_shard(
    spec: PlanSpec, n_listed: int, n_table: int, *pieces: pa.Table | TableFile
) -> tuple[pa.Table, dict[str, int]]:
    """One shard's plan: ``pieces`` are its listing (the first ``n_listed``), its table pieces (next ``n_table``),
    then its staged parts.

    Returns the objects to read (as the read stage takes them: ``last_modified_us`` and ``whole`` added) and counts:
    listed, todo, unchanged, non_image, gone (recorded objects no longer listed, not quarantined) and pending (flagged
    objects the action has not been applied to: the finish step has work) and staged (rows in staged parts)."""
    listing = _listing(pieces[:n_listed])  # type: ignore[arg-type]
    current = current_of(pieces[n_listed:], PLAN_COLUMNS)
    todo, unchanged, others = plan(listing, current, spec.fingerprint, spec.limits, spec.full)
    listed_keys = listing["key"]
    gone = pc.and_(pc.invert(pc.is_in(current["key"], value_set=listed_keys)), pc.is_null(current["quarantined_to"]))
    pending = 0
    if spec.action is not None:
        acted = current["quarantined_to"] if spec.action == "quarantine" else None
        not_acted = pc.is_null(acted) if acted is not None else pc.invert(pc.fill_null(current["tagged"], False))
        pending = pc.sum(pc.and_(pc.fill_null(current["flagged"], False), not_acted)).as_py() or 0
    counts = {
        "listed": listing.num_rows,
        "todo": todo.num_rows,
        "unchanged": unchanged,
        "non_image": others,
        "gone": pc.sum(gone).as_py() or 0,
        "pending": pending,
        "staged": sum(p.num_rows for p in pieces[n_listed + n_table :] if isinstance(p, pa.Table)),
    }
    return work_items(todo), counts


def work_items(todo: pa.Table) -> pa.Table:
    """Listing rows as the read stage takes them: the modification time in microseconds, and whether the object is
    named like an image (read whole) or is sniffed first."""
    us = pc.cast(pc.cast(todo["last_modified"], pa.timestamp("us", tz="UTC")), pa.int64())
    items = todo.set_column(todo.column_names.index("last_modified"), "last_modified_us", us)
    return items.append_column("whole", pa.array([named_image(k) for k in todo["key"].to_pylist()], pa.bool_()))


def lookup(keys: pa.Array, piece: pa.Table | TableFile) -> pa.Table:
    """The rows of one piece of the current view whose key is in ``keys`` (journal entries, reviewed objects): a
    file is filtered as it is decoded, a row group at a time, so only the matching rows are held."""
    if isinstance(piece, TableFile):
        return conform(_read_parquet(piece.dest, piece.rel, filters=pc.field("key").isin(keys)))
    table = conform(piece)
    return table.filter(pc.is_in(table["key"], value_set=keys))


@dataclass(frozen=True)
class FinishSpec:
    dest: Location
    run: int
    shards: int
    rewrite: bool  # the table is not cut into these shards (or does not exist): every shard writes its file
    source: Location
    quarantine: Location | None
    action: str | None
    apply: bool
    parts: WorkerParts | None  # where action updates are committed (None: no action)
    decisions: dict[str, str] = field(default_factory=dict)  # key -> review decision in force (reviewed keys only)
    restored: dict[str, str] = field(default_factory=dict)  # key -> etag of objects --release moved back


def shard_name(shard: int, shards: int, run: int) -> str:
    return f"shard-{shard:05d}-of-{shards:05d}-r{run:06d}.zstd.parquet"


def write_shard(dest: Location, shard: int, shards: int, run: int, rows: pa.Table) -> dict[str, Any]:
    """Write one shard's rows (one per key, sorted by key) as its table file; it is part of the table only once a
    commit names it. Returns what the commit needs: path (relative to the table root), size and rows."""
    rel = shard_name(shard, shards, run)
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd")
    dest.store.write(dest.key(f"{TABLE}/{rel}"), buf.getvalue())  # atomic: a PUT, or a temp file renamed into place
    return {"path": rel, "size": buf.tell(), "rows": rows.num_rows}


def finish_shard(spec: FinishSpec, shard: int, n_listed: int, n_table: int, *pieces: Any) -> dict[str, Any]:
    """One shard after scoring: actions on its flagged objects, then its slice of the new table version.

    ``pieces``: the shard's listing (first ``n_listed``), its table pieces (next ``n_table``), then its staged parts.
    The slice keeps the listed objects (and restored ones) plus quarantined ones. It is written as one file when
    something in it changed; returns that file (``add``: path, size, rows, or None), whether the shard's old file is
    replaced (``replaced``), its row count and the action report's counts."""
    tables = [p.select(["key", "etag"]).cast(KEY_ETAG) for p in pieces[:n_listed] if p.num_rows]
    listing = pa.concat_tables(tables) if tables else pa.table({"key": [], "etag": []}, KEY_ETAG)
    restored = {k: e for k, e in spec.restored.items() if shard_ids(pa.array([k]), spec.shards)[0] == shard}
    if restored:
        back = pa.table({"key": list(restored), "etag": list(restored.values())}, schema=KEY_ETAG)
        listing = pa.concat_tables([listing.filter(pc.invert(pc.is_in(listing["key"], back["key"]))), back])
    table_pieces, staged = pieces[n_listed : n_listed + n_table], pieces[n_listed + n_table :]
    current = current_of([*table_pieces, *staged])
    updates: list[pa.Table] = []

    class Capture:  # the action's updated rows: committed as a worker part, and folded into this shard's slice
        def commit(self, table: pa.Table) -> str | None:
            updates.append(table)
            return spec.parts.commit(table)  # type: ignore[union-attr]

    report = ActionReport(spec.action, spec.apply)
    if spec.action is not None:
        report = apply_actions(
            spec.action,
            spec.apply,
            current,
            listing,
            spec.source,
            spec.quarantine,
            spec.dest,
            Capture(),  # type: ignore[arg-type]
            spec.decisions,
        )
    if updates:
        current = latest_per_key([current, *updates])
    keep = pc.or_(pc.is_in(current["key"], value_set=listing["key"]), pc.is_valid(current["quarantined_to"]))
    snapshot = current.filter(keep)
    if snapshot.num_rows > 1 and not pc.all(pc.less(snapshot["key"][:-1], snapshot["key"][1:])).as_py():
        snapshot = snapshot.sort_by("key")  # sorted files: engines skip by the key's min and max
    staged_rows = sum(p.num_rows if isinstance(p, pa.Table) else 1 for p in staged)
    changed = spec.rewrite or bool(updates) or staged_rows > 0 or snapshot.num_rows != current.num_rows
    add = write_shard(spec.dest, shard, spec.shards, spec.run, snapshot) if changed and snapshot.num_rows else None
    counts = {"eligible": report.eligible, "done": report.done, "failed": report.failed}
    return {"add": add, "replaced": changed, "rows": snapshot.num_rows, "report": counts}


def sharded_files(files: list[tuple[str, int]]) -> tuple[int, dict[int, str]] | None:
    """(shards, shard -> file) when the table is cut into shards (one file per shard, named so), else None."""
    found: dict[int, str] = {}
    counts = set()
    for path, _ in files:
        m = _SHARD_FILE.match(path)
        if m is None or int(m[1]) in found:
            return None
        found[int(m[1])] = path
        counts.add(int(m[2]))
    if len(counts) > 1 or any(s >= n for n in counts for s in found):
        return None
    return (counts.pop() if counts else 1), found
