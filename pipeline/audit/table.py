"""The audit log's Delta Lake table at ``DEST/audit/``: append a group, read with filters, compact, apply retention.

The table is written and read through ``deltalake``, as the scan's results are (:mod:`pipeline.scan.table`: the same
S3 options, every log commit a create-if-absent), partitioned by ``day``. An append is retried a bounded number of
times (another writer created the table first, a commit lost to a concurrent one, a transient store error); each
carries its writer's id and group number as a Delta application transaction, so a retry after a commit that landed
but whose answer was lost is not written twice.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InvalidInput, StorageError
from ..scan.table import storage_options
from ..storage import Location, S3Store, parse_location
from .rows import SCHEMA

log = logging.getLogger(__name__)

TABLE = "audit"  # the table's folder under DEST
APPEND_ATTEMPTS = 5  # tries of one group's append (delta-rs itself retries a commit that lost its version race)
BACKOFF_S = 0.02  # doubled after each failed try


def location(dest: str | os.PathLike[str] | Location, endpoint_url: str | None = None) -> Location:
    return dest if isinstance(dest, Location) else parse_location(os.fspath(dest), endpoint_url, "audit DEST")


def table_uri(dest: Location) -> str:
    """``s3://bucket/prefix/audit`` or the local directory ``DEST/audit``."""
    if isinstance(dest.store, S3Store):
        return f"s3://{dest.store.bucket}/{dest.prefix}{TABLE}"
    return str(Path(dest.store.root, dest.prefix, TABLE))  # type: ignore[attr-defined]


def open_log(dest: Location) -> Any:
    """The ``deltalake.DeltaTable`` of DEST's audit log (latest version); None when there is none yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    uri = table_uri(dest)
    try:
        return DeltaTable(uri, storage_options=storage_options(dest))
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as exc:
        raise StorageError(f"cannot open the audit log {uri}: {type(exc).__name__}: {exc}") from None


def _existing(dest: Location) -> Any:
    dt = open_log(dest)
    if dt is None:
        raise InvalidInput(f"no audit log at {dest} (no Delta table at {table_uri(dest)})")
    return dt


def append(dest: Location, rows: pa.Table, writer: str, group: int, dt: Any = None) -> Any:
    """Append ``rows`` as one Delta commit (one data file per ``day`` in it), creating the table on the first write;
    returns the table, loaded, for the next append. ``writer``/``group``: the application transaction that makes a
    retry idempotent (``group`` increases with each append of that writer)."""
    from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake

    uri, error = table_uri(dest), None
    for attempt in range(APPEND_ATTEMPTS):
        try:
            if dt is None:
                dt = open_log(dest)
                if error is not None and dt is not None and (dt.transaction_version(writer) or -1) >= group:
                    return dt  # the failed try landed; its answer was lost
            write_deltalake(
                dt if dt is not None else uri,
                rows,
                mode="append",
                partition_by=["day"],
                storage_options=storage_options(dest) if dt is None else None,
                writer_properties=WriterProperties(compression="ZSTD"),
                commit_properties=CommitProperties(app_transactions=[Transaction(app_id=writer, version=group)]),
            )
            return dt if dt is not None else open_log(dest)
        except Exception as exc:  # noqa: BLE001 - deltalake's own errors, Arrow's, OSError, StorageError
            error, dt = exc, None
            log.debug("audit append to %s, try %d: %s: %s", uri, attempt + 1, type(exc).__name__, exc)
            time.sleep(BACKOFF_S * 2**attempt)
    raise StorageError(f"cannot append to the audit log {uri}: {type(error).__name__}: {error}")


def read_table(
    dest: str | Location,
    since: datetime | None = None,
    tenant: str | None = None,
    action: str | None = None,
    *,
    endpoint_url: str | None = None,
) -> pa.Table:
    """The rows of DEST's audit log, oldest first: from ``since`` on, of ``tenant``, with any image whose action is
    ``action``. :class:`InvalidInput` when DEST has no audit log."""
    import pyarrow.dataset as ds

    dest = location(dest, endpoint_url)
    dt = _existing(dest)
    where = None
    if since is not None:
        if since.tzinfo is None:
            raise InvalidInput(f"since {since!r}: allowed: a timezone-aware datetime")
        since = since.astimezone(UTC)
        where = (ds.field("day") >= since.strftime("%Y-%m-%d")) & (
            ds.field("time") >= pa.scalar(since, SCHEMA.field("time").type)
        )
    if tenant is not None:
        where = ds.field("tenant") == tenant if where is None else where & (ds.field("tenant") == tenant)
    try:
        table = dt.to_pyarrow_dataset().to_table(filter=where)
    except Exception as exc:  # noqa: BLE001 - deltalake's and Arrow's errors, OSError
        raise StorageError(f"cannot read the audit log {dt.table_uri}: {type(exc).__name__}: {exc}") from None
    if action is not None and table.num_rows:
        images = table["images"].combine_chunks()
        hit = pc.equal(pc.struct_field(pc.list_flatten(images), "action"), action)
        rows = pc.unique(pc.filter(pc.list_parent_indices(images), hit))
        table = table.take(rows)
    table = table.select([n for n in SCHEMA.names if n in table.column_names])
    return table.sort_by([("time", "ascending"), ("request_id", "ascending")])


def read(
    dest: str | Location,
    since: datetime | None = None,
    tenant: str | None = None,
    action: str | None = None,
    *,
    endpoint_url: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`read_table` as dicts (``time`` a UTC datetime), oldest first."""
    return read_table(dest, since, tenant, action, endpoint_url=endpoint_url).to_pylist()


def compact(dest: str | Location, *, endpoint_url: str | None = None) -> dict[str, int]:
    """Rewrite each day's small files into few large ones (Delta ``optimize.compact``); the files replaced stay until
    :func:`vacuum`. Returns ``{"files_added", "files_removed"}``."""
    dt = _existing(location(dest, endpoint_url))
    try:
        metrics = dt.optimize.compact()
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot compact the audit log {dt.table_uri}: {type(exc).__name__}: {exc}") from None
    return {"files_added": int(metrics["numFilesAdded"]), "files_removed": int(metrics["numFilesRemoved"])}


def vacuum(
    dest: str | Location, older_than: timedelta, *, now: datetime | None = None, endpoint_url: str | None = None
) -> dict[str, int]:
    """Retention: delete the rows whose ``time`` is before ``now - older_than`` (whole ``day`` partitions without
    reading them, the cut-off day's rows by rewriting its files), then delete the data files no version needs any
    more (Delta ``vacuum`` with no retention period, so earlier versions can no longer be read). Only files the log
    removed are deleted, never a file another writer has written and not yet committed.
    Returns ``{"rows_deleted", "files_deleted"}``."""
    if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
        raise InvalidInput(f"older_than {older_than!r}: allowed: a positive timedelta")
    dest = location(dest, endpoint_url)
    cut = (now or datetime.now(UTC)).astimezone(UTC) - older_than
    day = cut.strftime("%Y-%m-%d")
    predicate = f"day < '{day}' OR (day = '{day}' AND time < '{cut.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}')"
    deleted = _retried(dest, "delete old rows from", lambda dt: int(dt.delete(predicate)["num_deleted_rows"]))
    files = _retried(
        dest, "vacuum", lambda dt: dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    )
    return {"rows_deleted": deleted, "files_deleted": len(files)}


def _retried(dest: Location, what: str, op: Any) -> Any:
    """``op(table)`` on the latest version, again on a newer one when a concurrent commit (an append) won the race."""
    error: Exception | None = None
    for attempt in range(APPEND_ATTEMPTS):
        dt = _existing(dest)
        try:
            return op(dt)
        except Exception as exc:  # noqa: BLE001 - deltalake's own errors, OSError
            error = exc
            time.sleep(BACKOFF_S * 2**attempt)
    raise StorageError(f"cannot {what} the audit log {table_uri(dest)}: {type(error).__name__}: {error}")
