"""S3 Inventory reports as the scan's listing (``diffguard scan --inventory MANIFEST``), no LIST call per object.

S3 delivers an inventory as ``.../<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.json`` naming its data files
in the destination bucket::

    {"sourceBucket": "photos", "destinationBucket": "arn:aws:s3:::inventories", "fileFormat": "CSV" | "ORC" | "Parquet",
     "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, ..."  (CSV)
                   "struct<bucket:string,key:string,...>" (ORC) | "message s3.inventory { ... }" (Parquet),
     "files": [{"key": "inventories/photos/config/data/<uuid>.csv.gz", "size": 123, "MD5checksum": "..."}]}

CSV files are gzipped, without a header, columns in ``fileSchema`` order, keys URL-encoded (``+`` is a space, ``%2B``
a plus); ORC and Parquet files carry ``bucket, key, version_id, is_latest, is_delete_marker, size,
last_modified_date, e_tag, ...`` with plain keys. Every file is checked against its ``MD5checksum`` before a row is
used (fail closed: a file that does not match stops the scan). Rows become the listing's columns
(:data:`pipeline.scan.plan.LISTING_SCHEMA`); delete markers and noncurrent versions are dropped, then the SOURCE prefix
and the exclusions (DEST, the quarantine) apply exactly as for a listed bucket. The report is a snapshot: an object
changed since is read as it is now (its row records the version read), one deleted since is a read error, retried.

A manifest given as a local path reads its files from the nearest folder above it where ``files[].key`` exists (a
copy of the destination bucket), so reports can be tested and benchmarked without S3.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InvalidInput
from ..storage import LocalStore, Location, S3Store, StorageError, Store, parse_location
from .plan import LISTING_SCHEMA, excluded

log = logging.getLogger("diffguard")

FORMATS = ("CSV", "ORC", "Parquet")
# CSV fileSchema names -> the ORC/Parquet column names (the columns the scan uses; the others are ignored)
CSV_NAMES = {
    "Bucket": "bucket",
    "Key": "key",
    "VersionId": "version_id",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
    "Size": "size",
    "LastModifiedDate": "last_modified_date",
    "ETag": "e_tag",
}


@dataclass(frozen=True)
class Inventory:
    """A parsed manifest: where its files are and how to read them."""

    manifest: str  # where the manifest was read
    source_bucket: str
    file_format: str  # CSV | ORC | Parquet
    csv_columns: tuple[str, ...]  # CSV: the fileSchema's column names, in order (empty for ORC/Parquet)
    store: Store  # the destination bucket (or its local copy)
    files: tuple[tuple[str, str], ...]  # (key in ``store``, MD5 hex) of every data file


def _field(manifest: dict[str, Any], name: str, where: str) -> Any:
    if name not in manifest:
        raise InvalidInput(f"inventory manifest {where} has no {name!r} field (an S3 Inventory manifest.json has it)")
    return manifest[name]


def load_manifest(text: str, endpoint_url: str | None = None) -> Inventory:
    """Read and check ``manifest.json`` (s3://bucket/key or a local path)."""
    if text.startswith("s3://"):
        loc = parse_location(text, endpoint_url, "--inventory")
        raw, _ = loc.store.read(loc.prefix.rstrip("/"))
        where = text
    else:
        path = Path(text)
        if not path.is_file():
            raise InvalidInput(f"--inventory {text!r} is not a file (expected an S3 Inventory manifest.json)")
        raw, where = path.read_bytes(), str(path)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"--inventory {where} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise InvalidInput(f"--inventory {where} is a JSON {type(manifest).__name__}, expected an object")
    file_format = _field(manifest, "fileFormat", where)
    if file_format not in FORMATS:
        raise InvalidInput(f"inventory manifest {where}: fileFormat {file_format!r}, expected one of {FORMATS}")
    columns: tuple[str, ...] = ()
    if file_format == "CSV":
        columns = tuple(c.strip() for c in str(_field(manifest, "fileSchema", where)).split(","))
        if "Key" not in columns or "Bucket" not in columns:
            raise InvalidInput(f"inventory manifest {where}: fileSchema {columns} has no Bucket and Key columns")
    files = _field(manifest, "files", where)
    if not isinstance(files, list) or not all(isinstance(f, dict) and "key" in f for f in files):
        raise InvalidInput(f"inventory manifest {where}: 'files' must be a list of objects with a 'key'")
    destination = str(_field(manifest, "destinationBucket", where)).removeprefix("arn:aws:s3:::")
    if text.startswith("s3://"):
        store: Store = S3Store(destination, endpoint_url)
    else:
        store = LocalStore(str(_local_root(Path(text), [f["key"] for f in files])))
    refs = tuple((str(f["key"]), str(f.get("MD5checksum") or "")) for f in files)
    return Inventory(where, str(_field(manifest, "sourceBucket", where)), file_format, columns, store, refs)


def _local_root(manifest: Path, keys: list[str]) -> Path:
    """The folder above a local manifest that holds its files (a local copy of the destination bucket)."""
    if not keys:
        return manifest.parent
    for folder in manifest.resolve().parents:
        if (folder / keys[0]).is_file():
            return folder
    raise InvalidInput(f"--inventory {manifest}: no folder above it holds its first file {keys[0]!r}")


def read_file(inventory: Inventory, key: str, md5: str) -> pa.Table:
    """One inventory data file as raw inventory columns (``bucket, key, version_id, ...``), its MD5 checked."""
    data, _ = inventory.store.read(key)
    if md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != md5.lower():
        raise StorageError(
            f"inventory file {inventory.store.url(key)} does not match its MD5checksum {md5} in {inventory.manifest}"
        )
    if inventory.file_format == "Parquet":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    if inventory.file_format == "ORC":
        import pyarrow.orc as orc

        return orc.ORCFile(io.BytesIO(data)).read()
    import pyarrow.csv as csv

    body = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    names = [CSV_NAMES.get(c, c) for c in inventory.csv_columns]
    table = csv.read_csv(
        io.BytesIO(body),
        read_options=csv.ReadOptions(column_names=names),
        convert_options=csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True),
    )
    keys = pa.array([unquote_plus(k) for k in table["key"].to_pylist()], pa.string())  # URL-encoded in CSV only
    table = table.set_column(table.column_names.index("key"), "key", keys)
    for name in ("is_latest", "is_delete_marker"):
        if name in table.column_names:
            i = table.column_names.index(name)
            table = table.set_column(i, name, pc.equal(pc.utf8_lower(table[name]), "true"))
    if "size" in table.column_names:
        table = table.set_column(table.column_names.index("size"), "size", table["size"].cast(pa.int64()))
    if "last_modified_date" in table.column_names:
        stamps = pc.strptime(
            pc.replace_substring_regex(table["last_modified_date"], r"\.\d+Z$", "Z"), "%Y-%m-%dT%H:%M:%SZ", "s"
        )
        table = table.set_column(table.column_names.index("last_modified_date"), "last_modified_date", stamps)
    return table


def listing(raw: pa.Table, source: Location, source_bucket: str, exclude: list[str]) -> pa.Table:
    """Raw inventory rows -> the listing's columns for the objects under SOURCE (current versions, no delete markers,
    not excluded), keys relative to the bucket as a LIST gives them."""
    n = raw.num_rows

    def column(name: str, type_: pa.DataType) -> Any:
        if name not in raw.column_names:
            return pa.nulls(n, type_)
        return raw[name].cast(type_)

    keep = pc.starts_with(column("key", pa.string()), source.prefix) if source.prefix else pa.array([True] * n)
    if "bucket" in raw.column_names:
        keep = pc.and_(keep, pc.fill_null(pc.equal(raw["bucket"], source_bucket), False))
    keep = pc.and_(keep, pc.fill_null(column("is_latest", pa.bool_()), True))
    keep = pc.and_(keep, pc.invert(pc.fill_null(column("is_delete_marker", pa.bool_()), False)))
    keep = pc.and_(keep, pc.is_valid(column("size", pa.int64())))
    if exclude:
        keep = pc.and_(keep, pc.invert(excluded(column("key", pa.string()), exclude)))
    etag = pc.replace_substring_regex(column("e_tag", pa.string()), r'^"|"$', "")
    modified = column("last_modified_date", pa.timestamp("us", tz="UTC"))
    table = pa.table(
        [column("key", pa.string()), etag, column("size", pa.int64()), modified, column("version_id", pa.string())],
        schema=LISTING_SCHEMA,
    )
    return table.filter(keep)


def check_source(inventory: Inventory, source: Location) -> None:
    if not isinstance(source.store, S3Store):
        raise InvalidInput(f"--inventory lists an S3 bucket; SOURCE {source} must be s3://bucket/prefix")
    if inventory.source_bucket != source.store.bucket:
        raise InvalidInput(
            f"--inventory {inventory.manifest} is a report of bucket {inventory.source_bucket!r}, "
            f"not of SOURCE's bucket {source.store.bucket!r}"
        )
