"""Where a scanned object is now: its quarantine copy once moved, else its place in the SOURCE the scan read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..scan.storage import LocalStore, S3Store, Store


def object_store(url: str, endpoint_url: str | None) -> tuple[Store, str]:
    """The store and key of an object URL: ``s3://bucket/key``, or an absolute path."""
    if url.startswith("s3://"):
        bucket, _, key = url[5:].partition("/")
        return S3Store(bucket, endpoint_url), key
    path = Path(url)
    return LocalStore(str(path.parent)), path.name


def locate(row: dict[str, Any], endpoint_url: str | None) -> tuple[Store, str]:
    """(store, key) of a scan row's object (``bucket``, ``key``, ``quarantined_to``)."""
    if row.get("quarantined_to"):
        return object_store(row["quarantined_to"], endpoint_url)
    if row["bucket"].startswith("/"):  # a local scan's rows name the absolute source directory
        return LocalStore(row["bucket"]), row["key"]
    return S3Store(row["bucket"], endpoint_url), row["key"]
