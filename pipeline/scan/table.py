"""The scan's completed results as a Delta Lake table at ``DEST/results/``, read and committed through ``deltalake``.

Each completed run is one Delta commit (an overwrite holding exactly one row per object) that also records the run
number as a Delta *application transaction* (``txn`` action, app id :data:`APP_ID`), so the log itself says which run
a version holds: a reader needs no other file to know which staged parts (``DEST/parts/run-M``) are newer than the
table. Earlier runs stay readable as earlier versions (``DeltaTable(uri, version=N)``) until ``vacuum`` removes their
files. The commit is atomic: delta-rs writes the data files first, then creates ``_delta_log/<version>.json`` without
replacing an existing one (a rename that refuses to replace locally; ``PutObject`` with ``If-None-Match: *`` on S3),
so of two writers racing for one version exactly one succeeds.

>>> dt = open_table(dest)              # None when DEST has no table yet
>>> table_run(dt), dt.version()        # the run the latest version holds, and that version
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..storage import Location, S3Store, StorageError

log = logging.getLogger(__name__)

APP_ID = "diffguard-scan"  # Delta application-transaction id; its version is the scan run a table version holds
TABLE = "results"  # the table's folder under DEST


def table_uri(dest: Location) -> str:
    """``s3://bucket/prefix/results`` or the local directory ``DEST/results``."""
    if isinstance(dest.store, S3Store):
        return f"s3://{dest.store.bucket}/{dest.prefix}{TABLE}"
    return str(Path(dest.store.root, dest.prefix, TABLE))  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str, endpoint_url: str | None) -> str | None:
    """The bucket's region as S3 reports it (``x-amz-bucket-region``): delta-rs does not follow region redirects."""
    from botocore.exceptions import BotoCoreError, ClientError

    store = S3Store(bucket, endpoint_url)
    try:
        head = store.client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError):
        return None
    return head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")


def storage_options(dest: Location) -> dict[str, str] | None:
    """deltalake ``storage_options`` for DEST: boto3's endpoint, region and credentials (its standard chain).

    ``AWS_ENDPOINT_URL`` is passed only for another S3 API (``--endpoint-url`` or ``$AWS_ENDPOINT_URL``), with
    ``AWS_ALLOW_HTTP`` when it is plain HTTP; ``conditional_put: etag`` makes every log commit a create-if-absent.
    """
    store = dest.store
    if not isinstance(store, S3Store):
        return None
    client = store.client
    options = {"conditional_put": "etag"}
    endpoint = store.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = _bucket_region(store.bucket, store.endpoint_url) or client.meta.region_name or "us-east-1"
    options["AWS_REGION"] = region
    import boto3

    credentials = boto3.session.Session().get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()  # fresh for every open: temporary credentials are renewed
        options["AWS_ACCESS_KEY_ID"], options["AWS_SECRET_ACCESS_KEY"] = frozen.access_key, frozen.secret_key
        if frozen.token:
            options["AWS_SESSION_TOKEN"] = frozen.token
    return options


def open_table(dest: Location, version: int | None = None) -> Any:
    """The ``deltalake.DeltaTable`` at ``DEST/results`` (latest version, or ``version``); None when there is none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    uri = table_uri(dest)
    try:
        return DeltaTable(uri, version=version, storage_options=storage_options(dest))
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as exc:
        raise StorageError(f"cannot open the Delta table {uri}: {type(exc).__name__}: {exc}") from None


def table_run(dt: Any) -> int:
    """The scan run the table's loaded version holds (its :data:`APP_ID` application transaction)."""
    run = dt.transaction_version(APP_ID)
    if run is None:
        raise StorageError(
            f"{dt.table_uri} is a Delta table without a diffguard run (no application transaction {APP_ID!r}): "
            "not written by a scan; move it away or choose another --output"
        )
    return int(run)


def read_table(dt: Any) -> pa.Table:
    try:
        return dt.to_pyarrow_table()
    except Exception as exc:  # noqa: BLE001 - deltalake raises its own errors, Arrow's and OSError
        raise StorageError(f"cannot read the Delta table {dt.table_uri}: {type(exc).__name__}: {exc}") from None


def commit(dest: Location, table: pa.Table, run: int, run_id: str | None = None) -> int:
    """Overwrite the table with ``table`` as run ``run``, in one Delta commit; returns the new version.

    The commit is not retried by delta-rs against a newer version (``max_commit_retries=0``): a failed commit is
    checked against the log, and counts as done only when the latest version holds ``run`` and ``run_id`` (a commit
    that landed but whose answer was lost; S3 then refuses the retried create with 412).
    """
    from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake
    from deltalake.exceptions import DeltaError

    uri = table_uri(dest)
    try:
        write_deltalake(
            uri,
            table,
            mode="overwrite",
            schema_mode="overwrite",  # the table's schema is the rows' (ROW_SCHEMA, plus columns a newer scan added)
            storage_options=storage_options(dest),
            writer_properties=WriterProperties(compression="ZSTD"),
            commit_properties=CommitProperties(
                app_transactions=[Transaction(app_id=APP_ID, version=run)],
                custom_metadata=_metadata(run, run_id),
                max_commit_retries=0,
            ),
        )
    except (DeltaError, OSError) as exc:
        return _committed(dest, run, run_id, exc)
    return _committed(dest, run, run_id)


def table_files(dt: Any) -> list[tuple[str, int]]:
    """(path relative to the table root, rows) of every data file in the loaded version (read from the log)."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    rows = adds["num_records"].fill_null(-1) if "num_records" in adds.column_names else pa.nulls(adds.num_rows)
    return list(zip(adds["path"].to_pylist(), rows.to_pylist(), strict=True))


def commit_files(
    dest: Location,
    adds: list[dict[str, Any]],
    removes: list[str],
    run: int,
    schema: pa.Schema,
    overwrite: bool,
    run_id: str | None = None,
) -> int:
    """Commit data files already written under the table root as run ``run``, in one Delta commit; returns the new
    version. ``adds``: ``{"path", "size", "rows"}`` of each new file; ``removes``: paths of files it replaces.
    ``overwrite``: the new files are the whole table (every earlier file removed, the schema replaced). With neither
    adds nor removes the commit records the run alone. ``run_id``: the run's unique id (its lock's), recorded with
    the run number in the commit's metadata. Retries and lost answers as :func:`commit`.
    """
    import time

    from deltalake import CommitProperties, Schema, Transaction
    from deltalake.exceptions import DeltaError
    from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

    now = int(time.time() * 1000)
    actions = [AddAction(a["path"], a["size"], {}, now, True, json.dumps({"numRecords": a["rows"]})) for a in adds]
    props = CommitProperties(
        app_transactions=[Transaction(app_id=APP_ID, version=run)],
        custom_metadata=_metadata(run, run_id),
        max_commit_retries=0,
    )
    uri, options = table_uri(dest), storage_options(dest)
    try:
        dt = open_table(dest)
        if dt is None:
            create_table_with_add_actions(
                uri, Schema.from_arrow(schema), actions, mode="error", storage_options=options, commit_properties=props
            )
        elif overwrite:
            _add_columns(dt, schema)
            dt.create_write_transaction(actions, mode="overwrite", schema=schema, commit_properties=props)
        else:
            _add_columns(dt, schema)
            removed = [RemoveAction(path, True, now) for path in removes]
            dt.create_write_transaction([*actions, *removed], mode="append", schema=schema, commit_properties=props)
    except (DeltaError, OSError) as exc:
        return _committed(dest, run, run_id, exc)
    return _committed(dest, run, run_id)


def _add_columns(dt: Any, schema: pa.Schema) -> None:
    """Add the columns of ``schema`` that the table lacks (a newer diffguard's: ``detector_scores``, ...) to its schema,
    in a commit of their own before the files that carry them: a data commit does not change the table's schema, and
    readers would drop those columns. Older rows read them as null. Not a run: no application transaction."""
    from deltalake import CommitProperties, Field

    have = set(dt.schema().to_arrow().names)
    missing = [f for f in schema if f.name not in have]
    if missing:
        names = ", ".join(f.name for f in missing)
        log.info("adding column(s) %s to the Delta table %s", names, dt.table_uri)
        props = CommitProperties(custom_metadata={"diffguard.added_columns": names}, max_commit_retries=0)
        dt.alter.add_columns([Field.from_arrow(f) for f in missing], commit_properties=props)


def _metadata(run: int, run_id: str | None) -> dict[str, str]:
    """The commit's custom metadata (in its ``commitInfo``): the run number and, from scans, the run's unique id."""
    return {"diffguard.run": str(run)} | ({"diffguard.run_id": run_id} if run_id else {})


def commit_run_id(dest: Location, version: int) -> str | None:
    """The ``diffguard.run_id`` in the ``commitInfo`` of the table's commit ``version`` (None: a commit without one, as
    older scans wrote). Read from the log file itself, one GET: ``DeltaTable.history`` lists the whole log on S3, and
    delta-rs 1.6 mislabels the history of a table loaded at an older version."""
    key = dest.key(f"{TABLE}/_delta_log/{version:020d}.json")
    if dest.store.head(key) is None:
        return None
    for line in dest.store.read(key)[0].splitlines():
        action = json.loads(line) if line.strip() else {}
        if "commitInfo" in action:
            return action["commitInfo"].get("diffguard.run_id")
    return None


def _ours(dest: Location, dt: Any, run: int, run_id: str | None) -> bool:
    """The latest version holds ``run``, committed by the run ``run_id`` (when given)."""
    if dt is None or dt.transaction_version(APP_ID) != run:
        return False
    return run_id is None or commit_run_id(dest, dt.version()) == run_id


def _committed(dest: Location, run: int, run_id: str | None = None, error: Exception | None = None) -> int:
    """The version that holds ``run`` after a commit: after a failed one, the log decides (a commit that landed but
    whose answer was lost counts once: the latest version holds our run number and our run id; another scan's commit
    of the same number is not ours); after a successful one, the latest version must be ours (one scan per DEST at a
    time: :mod:`pipeline.scan.lock`)."""
    dt, uri = open_table(dest), table_uri(dest)
    if error is not None:
        if _ours(dest, dt, run, run_id):
            return dt.version()
        raise StorageError(
            f"cannot commit run {run} to the Delta table {uri}: {type(error).__name__}: {error}"
        ) from None
    if dt is None or table_run(dt) != run or not _ours(dest, dt, run, run_id):  # another writer committed after ours
        raise StorageError(f"the Delta table {uri} changed while run {run} committed: is another scan writing to it?")
    return dt.version()
