"""Scan results under DEST: a Delta Lake table of completed runs, staged Parquet parts, a manifest, the current view.

```
DEST/
  _diffguard_scan.json                  manifest (format 2): the source, the table version, the last run's summary
  results/                              Delta table: one row per object as of the last completed run (run 7)
    _delta_log/00000000000000000006.json  one commit per completed run; its txn action records the run number
    shard-00000-of-00004-r000007.zstd.parquet
                                        one file per shard of the keys (pipeline.scan.shards), rewritten by the
                                        runs in which a row of that shard changed
  parts/run-000008/part-000000.parquet  rows committed by the driver of a later run (in flight, or killed)
  parts/run-000008/part-000001-w3f9a0c1d2e3b4a59.parquet
                                        scored rows of that run, committed by a scoring worker (sorts before 000001)
  _quarantine/<id>.json                 quarantine moves in flight (pipeline.scan.actions)
```

Every file is written atomically (an S3 PUT, or a local temp file renamed into place), so a part is either all there
or absent. The **current view** is the table's latest version plus every part of a later run than the one that
version holds (:mod:`pipeline.scan.table`), keeping the latest row per key (parts are ordered by run number, then
part number): a row is visible once its part is committed, never twice, and a killed run's committed parts count for
the rerun. The driver numbers its parts (:class:`PartWriter`: journal recovery before scoring, actions and releases
after it); scoring workers write theirs in parallel without coordination (:class:`WorkerParts`), each named by the
driver's next part number when scoring began plus a digest of the keys it holds (``part-000001-w<16 hex>``): they
sort after the driver's earlier parts and before its part 000001 (among themselves in any order: a key is scored once
per run, and a retried write of the same rows replaces its own file). Parts of the previous version (the driver's
only) are read the same way.

A completed run compacts (:mod:`pipeline.scan.commit`): one Delta commit (the objects still present, plus quarantined
ones, recording the run: the atomic step; only the shards in which a row changed get a new file), then the manifest
naming that version, then the parts it folded in are deleted. A crash before the
commit leaves the previous version and the parts; after it, parts of that run or older are ignored.

Format 1 (before Delta): ``snapshots/run-N.parquet`` named by a format-1 manifest instead of the table. It is read as
it is, and converted once by the next scan (:func:`migrate`): the table is committed (as run N) first, then the
manifest switches to format 2, and only then is the old snapshot deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InvalidInput, ObjectExists
from ..storage import Location, StorageError, parse_location
from .table import TABLE, commit, open_table, read_table, table_files, table_run, table_uri

log = logging.getLogger(__name__)

MANIFEST = "_diffguard_scan.json"
FORMAT = 2  # results in the Delta table DEST/results; 1: in snapshots/run-N.parquet (read, and migrated by a scan)
_TS = pa.timestamp("us", tz="UTC")

# One row per object. New columns may be added (readers fill older rows with nulls); never rename these.
ROW_SCHEMA = pa.schema(
    [
        ("bucket", pa.string()),  # S3 bucket, or the absolute source directory
        ("key", pa.string()),  # S3 object key, or the path relative to the source directory
        ("etag", pa.string()),  # of the version read (S3 ETag without quotes; local: size-mtime_ns-ctime_ns-inode, hex)
        ("size", pa.int64()),  # bytes
        ("last_modified", _TS),
        ("sha256", pa.string()),  # of the bytes scored (null when they could not be read); verifies quarantine copies
        ("nsfw", pa.bool_()),
        ("concept_scores", pa.list_(pa.float64())),  # margins: cosine - threshold + adjustment; > 0 is a hit
        ("special_scores", pa.list_(pa.float64())),
        ("bad_concepts", pa.list_(pa.int32())),  # indices into concept_scores
        ("bad_concept_names", pa.list_(pa.string())),
        ("special_care", pa.bool_()),
        ("categories", pa.map_(pa.string(), pa.float64())),  # policy category -> its highest concept margin
        ("flagged_categories", pa.list_(pa.string())),  # categories with a margin > 0
        ("action", pa.string()),  # what the policy does with the image: allow | flag | blur | black | block
        ("flagged", pa.bool_()),  # the policy withholds the image (blur | black | block): what actions act on
        ("error", pa.string()),  # why the object has no scores (null when scored)
        # "read": retried next run, never acted on | "decode": unscorable content, withheld (unscorable_action), not
        # retried while unchanged | "not_image": not an image by its first bytes, not read again while unchanged
        ("error_kind", pa.string()),
        ("model_fingerprint", pa.string()),  # SafetyChecker.fingerprint: weights, concept rows, policy, adjustment
        ("max_pixels", pa.int64()),  # decode limit in force (a changed limit retries "too large" errors)
        ("scanned_at", _TS),
        ("quarantined_to", pa.string()),  # where the object now is, once moved by --quarantine --apply
        ("tagged", pa.bool_()),  # moderation=nsfw was set by --tag --apply
        ("truncated", pa.bool_()),  # a truncated file, scored on what decodes (what a browser shows)
        ("unscorable", pa.bool_()),  # read but not scorable: error set, the policy's unscorable_action as action
        ("version_id", pa.string()),  # S3 VersionId of the version read (versioned buckets), else null
        ("max_object_bytes", pa.int64()),  # --max-object-bytes in force (a changed limit retries "too large" errors)
        ("views", pa.int32()),  # views scored: frames, pages, backgrounds under the alpha, tiles (pipeline.views)
        ("views_total", pa.int32()),  # views the object has (more than `views` when sampled)
        ("views_sampled", pa.bool_()),  # over --max-views: frames sampled evenly over display time
        ("view", pa.string()),  # the view that decided: "frame 12 @ 1.50 s", "page 2", "over white", "tile 3/3"
        # detector -> output -> probability (the policy's detectors: pipeline.detectors); older rows: null
        ("detector_scores", pa.map_(pa.string(), pa.map_(pa.string(), pa.float64()))),
        ("demo", pa.list_(pa.string())),  # parts of the verdict from demo weights (meaningless): "stock checker", ...
        ("real", pa.list_(pa.string())),  # parts of the verdict from real, trained weights: "open_nsfw", ...
    ]
)

NOT_IMAGE = "not_image"  # error_kind of an object that is not an image (kept so it is not sniffed again)

_PART = re.compile(r"^parts/run-(\d{6,})/part-(\d{6,})(-w[0-9a-f]{16})?\.parquet$")  # group 3: a worker's part
_SNAPSHOT = re.compile(r"^snapshots/run-(\d{6,})\.parquet$")


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def conform(table: pa.Table) -> pa.Table:
    """Add the schema's missing columns as nulls and cast known ones; columns this version does not know are kept."""
    for f in ROW_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        elif table.schema.field(f.name).type != f.type:
            i = table.column_names.index(f.name)
            table = table.set_column(i, f, table[f.name].cast(f.type))
    names = ROW_SCHEMA.names + [n for n in table.column_names if n not in ROW_SCHEMA.names]
    return table.select(names)


def latest_per_key(tables: list[pa.Table]) -> pa.Table:
    """Concatenate in commit order and keep each key's last row."""
    if not tables:
        return ROW_SCHEMA.empty_table()
    table = pa.concat_tables([conform(t) for t in tables], promote_options="default")
    table = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    last = table.group_by("key").aggregate([("_order", "max")])["_order_max"]
    return table.filter(pc.is_in(table["_order"], value_set=last)).drop_columns(["_order"]).sort_by("key")


def _read_parquet(dest: Location, rel: str, **options: Any) -> pa.Table:
    """A Parquet file under DEST (``options`` for ``pq.read_table``: columns, filters)."""
    data, _ = dest.store.read(dest.key(rel))
    try:
        return pq.read_table(io.BytesIO(data), **options)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"{dest.store.url(dest.key(rel))} is not a readable Parquet file: {exc}") from None


@dataclass
class State:
    """What DEST holds: the manifest and the current view (one row per key)."""

    manifest: dict[str, Any]
    current: pa.Table
    last_run: int  # the highest run number found (table, snapshot or parts); the next run is last_run + 1
    table_version: int | None = None  # the Delta version read (None: no table yet)
    table_run: int = 0  # the run that version (or a format-1 snapshot) holds; parts of later runs are staged rows

    def index(self) -> dict[str, int]:
        """key -> row number in ``current``."""
        return {k: i for i, k in enumerate(self.current["key"].to_pylist())}


def _files(dest: Location) -> list[tuple[str, int, tuple[int, int], str]]:
    """("part" | "snapshot", run, order within the run, relative key) of every staged or format-1 results file.

    The order of part P is (P, 1) for the driver's part, (P, 0) for a worker's part written before the driver's P."""
    out = []
    for prefix in ("parts/", "snapshots/"):  # the table's own files are listed by nobody but delta-rs
        for info in dest.store.list(dest.key(prefix)):
            rel = info.key[len(dest.prefix) :]
            if m := _PART.match(rel):
                out.append(("part", int(m[1]), (int(m[2]), 0 if m[3] else 1), rel))
            elif m := _SNAPSHOT.match(rel):
                out.append(("snapshot", int(m[1]), (-1, 0), rel))
    return out


@dataclass
class Meta:
    """What DEST holds, without reading a row: the manifest, the table's files and the staged parts."""

    manifest: dict[str, Any]
    last_run: int  # the highest run number found; the next run is last_run + 1
    table_version: int | None  # the Delta version (None: no table yet)
    table_run: int  # the run that version holds; parts of later runs are staged rows
    files: list[tuple[str, int]]  # the version's data files: (path relative to the table root, rows)
    parts: list[str]  # staged parts of later runs, relative to DEST, in commit order


def load_meta(dest: Location) -> Meta:
    """DEST's layout for a scan: a format-1 DEST must be migrated (:func:`migrate`) first."""
    manifest = read_manifest(dest)
    if manifest.get("format") == 1:
        raise InvalidInput(f"{dest} holds format-1 results: migrate() converts them first")
    dt = open_table(dest)
    if dt is None and manifest.get("format") == FORMAT:
        raise StorageError(f"{dest} has a format-{FORMAT} manifest but no Delta table at {table_uri(dest)}")
    version, run = (dt.version(), table_run(dt)) if dt is not None else (None, 0)
    files = _files(dest)
    parts = [rel for _, _, rel in sorted((r, p, rel) for kind, r, p, rel in files if kind == "part" and r > run)]
    last_run = max([run, *(r for _, r, _, _ in files)])
    return Meta(manifest, last_run, version, run, table_files(dt) if dt is not None else [], parts)


def read_manifest(dest: Location) -> dict[str, Any]:
    """The manifest ({} when there is none yet); format 1 or 2, anything else is refused."""
    if dest.store.head(dest.key(MANIFEST)) is None:
        return {}
    raw, _ = dest.store.read(dest.key(MANIFEST))
    manifest = json.loads(raw)
    if manifest.get("format") not in (1, FORMAT):
        raise InvalidInput(
            f"{dest} holds scan results of format {manifest.get('format')!r}; this version reads formats 1 and {FORMAT}"
        )
    return manifest


def load_state(dest: Location) -> State:
    """The current view: the table's latest version (else a format-1 snapshot) plus the parts of later runs."""
    manifest = read_manifest(dest)
    dt = open_table(dest)
    snap_run = int(manifest.get("snapshot_run", 0)) if manifest.get("format") == 1 else 0
    base: list[pa.Table] = []
    version, base_run = None, 0
    if dt is not None and table_run(dt) >= snap_run:  # the Delta log commit is the truth once it exists
        version, base_run = dt.version(), table_run(dt)
        base = [read_table(dt)]
    elif manifest.get("format") == FORMAT:
        raise StorageError(f"{dest} has a format-{FORMAT} manifest but no Delta table at {table_uri(dest)}")
    elif manifest.get("snapshot"):  # format 1, not yet migrated
        base, base_run = [_read_parquet(dest, manifest["snapshot"])], snap_run
    files = _files(dest)
    parts = sorted((run, part, rel) for kind, run, part, rel in files if kind == "part" and run > base_run)
    tables = base + [_read_parquet(dest, rel) for _, _, rel in parts]
    last_run = max([base_run, snap_run, *(run for _, run, _, _ in files)])
    if len(tables) == 1 and not parts:  # the table alone already holds one row per key: no copy to dedupe
        current = conform(tables[0])
        keys = current["key"]
        if version is not None and current.num_rows > 1 and not pc.all(pc.less(keys[:-1], keys[1:])).as_py():
            current = current.sort_by("key")  # written sorted; several data files may come back in another order
        return State(manifest, current, last_run, version, base_run)
    return State(manifest, latest_per_key(tables), last_run, version, base_run)


def read_current(dest: str | Location, endpoint_url: str | None = None, *, non_images: bool = False) -> pa.Table:
    """The current view of a scan's results: exactly one row per image object (the latest committed row).

    Objects found not to be images are recorded too (``error_kind == "not_image"``, so an unchanged one is not read
    again); ``non_images=True`` includes their rows.

    >>> from pipeline.scan import read_current
    >>> table = read_current("s3://bucket/scan-results")   # or a local directory; a pyarrow.Table
    >>> flagged = table.filter(table["flagged"])           # what the policy withholds (nsfw: the stock decision)
    """
    location = parse_location(dest, endpoint_url, "results") if isinstance(dest, str) else dest
    current = load_state(location).current
    if non_images:
        return current
    return current.filter(pc.fill_null(pc.not_equal(current["error_kind"], NOT_IMAGE), True))


def _write_part(dest: Location, rel: str, table: pa.Table, exclusive: bool = False) -> None:
    """Write a part atomically (a PUT, or a temp file renamed into place). ``exclusive``: never over another file
    (:meth:`Store.create`); one already there with exactly these bytes is this writer's own earlier attempt (a retried
    PUT whose first answer was lost), other bytes are another writer's: :class:`StorageError`."""
    buf = io.BytesIO()
    pq.write_table(conform(table), buf, compression="zstd")
    data, key = buf.getvalue(), dest.key(rel)
    if not exclusive:
        dest.store.write(key, data)  # a worker's part: a retried task rewrites its own file
    else:
        try:
            dest.store.create(key, data)
        except ObjectExists:
            if dest.store.read(key)[0] != data:
                raise StorageError(
                    f"{dest.store.url(key)} was written by another writer (its bytes differ from this run's part "
                    f"{rel}); not overwritten: is another scan writing to {dest}?"
                ) from None
            log.debug("%s was already written by this run (a retried write)", rel)
    log.debug("committed %s (%d rows)", rel, table.num_rows)


class PartWriter:
    """The driver's parts of one run, numbered in commit order, each written atomically and exclusively (a part
    already under its name with other bytes is another writer's: :class:`StorageError`, never overwritten).

    >>> writer = PartWriter(dest, run=8)
    >>> writer.commit(rows)          # parts/run-000008/part-000000.parquet
    >>> workers = writer.workers()   # picklable: scoring workers commit their own parts with it
    """

    def __init__(self, dest: Location, run: int):
        self.dest, self.run, self.parts = dest, run, 0

    def commit(self, table: pa.Table) -> str | None:
        if table.num_rows == 0:
            return None
        rel = f"parts/run-{self.run:06d}/part-{self.parts:06d}.parquet"
        _write_part(self.dest, rel, table, exclusive=True)
        self.parts += 1
        return rel

    def workers(self) -> WorkerParts:
        """Where workers commit rows produced from now on: after this writer's earlier parts and before its later
        ones (the slot is reserved: the driver's next part, and the next workers' slot, sort after these)."""
        slot = WorkerParts(self.dest, self.run, self.parts)
        self.parts += 1
        return slot


@dataclass(frozen=True)
class WorkerParts:
    """Parts of one run written by scoring workers in parallel, without coordination, each atomically.

    Each is named by ``slot`` (the driver's next part number) and a digest of the keys it holds, so names never
    collide within a run (a key is scored once per run) and the parts sort before the driver's part ``slot``.

    >>> WorkerParts(dest, run=8, slot=1).commit(rows)   # parts/run-000008/part-000001-w<16 hex>.parquet
    """

    dest: Location
    run: int
    slot: int

    def commit(self, table: pa.Table) -> str | None:
        if table.num_rows == 0:
            return None
        digest = hashlib.sha256()
        for key in sorted(table["key"].to_pylist()):  # the same rows always get the same name
            raw = key.encode()
            digest.update(len(raw).to_bytes(4, "big") + raw)
        rel = f"parts/run-{self.run:06d}/part-{self.slot:06d}-w{digest.hexdigest()[:16]}.parquet"
        _write_part(self.dest, rel, table)
        return rel


def _write_manifest(dest: Location, manifest: dict[str, Any]) -> None:
    dest.store.write(dest.key(MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())


def _delete_folded(dest: Location, run: int) -> None:
    """Delete the parts of runs up to ``run`` (now in the table) and every format-1 snapshot."""
    for kind, file_run, _, rel in _files(dest):
        if kind == "snapshot" or file_run <= run:
            dest.store.delete(dest.key(rel))
    dest.store.tidy(dest.prefix)


def migrate(dest: Location) -> bool:
    """Convert a format-1 DEST (``snapshots/run-N.parquet``) to the Delta table, once, losing nothing.

    The table is committed as run N first (skipped when a crashed conversion already committed it), then the
    manifest switches to format 2, then the old snapshot is deleted: a crash between any two steps leaves a DEST that
    :func:`load_state` reads as before and the next call finishes. Returns True when it converted (or finished).
    """
    manifest = read_manifest(dest)
    old = manifest.get("migrated_from")
    if manifest.get("format") == FORMAT and old and dest.store.head(dest.key(old)) is not None:
        _delete_folded(dest, 0)  # converted, but killed before the old snapshot was deleted
        log.warning("WARNING: %s converted earlier: deleted the old snapshot %s", dest, dest.store.url(dest.key(old)))
        return True
    if manifest.get("format") != 1 or not manifest.get("snapshot"):
        return False
    run, old = int(manifest["snapshot_run"]), manifest["snapshot"]
    log.warning(
        "WARNING: converting %s from format 1 to %d: snapshot %s (run %d, %s rows) becomes the Delta table %s",
        dest,
        FORMAT,
        dest.store.url(dest.key(old)),
        run,
        manifest.get("rows", "?"),
        table_uri(dest),
    )
    dt = open_table(dest)
    if dt is not None and table_run(dt) >= run:
        version = dt.version()
    else:
        version = commit(dest, conform(_read_parquet(dest, old)), run)
    manifest = {k: v for k, v in manifest.items() if k != "snapshot"}
    _write_manifest(dest, {**manifest, "format": FORMAT, "table": TABLE, "version": version, "migrated_from": old})
    _delete_folded(dest, 0)  # the format-1 snapshots only; parts of later runs stay staged
    log.warning("WARNING: %s converted: Delta table %s version %d holds run %d", dest, table_uri(dest), version, run)
    return True
