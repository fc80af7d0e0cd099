"""`diffguard scan --inventory MANIFEST`: SOURCE listed from an S3 Inventory report (CSV, ORC, Parquet) over moto.

The report is written as S3 writes one: a manifest.json naming data files in a destination bucket, CSV gzipped without
a header and with URL-encoded keys, each file with its MD5checksum. The rows it lists for other buckets, outside
SOURCE, noncurrent versions, delete markers, DEST and the quarantine never become candidates.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from tests.integration.scan_support import (
    new_bucket,
    png,
    put_many,
    rows_by_key,
    scan,
)

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"


def listed(s3, bucket: str) -> list[dict]:
    """The bucket's objects as inventory rows (what S3 Inventory would report for them)."""
    rows = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            rows.append(
                {
                    "bucket": bucket,
                    "key": o["Key"],
                    "version_id": None,
                    "is_latest": True,
                    "is_delete_marker": False,
                    "size": o["Size"],
                    "last_modified_date": o["LastModified"],
                    "e_tag": o["ETag"].strip('"'),
                    "storage_class": "STANDARD",
                }
            )
    return rows


def noise(bucket: str, template: dict) -> list[dict]:
    """Rows a report holds that the scan must not read: other buckets, noncurrent versions, delete markers, DEST."""
    return [
        {**template, "bucket": "another-bucket", "key": "imgs/elsewhere.png"},
        {**template, "key": "imgs/old.png", "version_id": "v1", "is_latest": False},
        {**template, "key": "imgs/deleted.png", "version_id": "v2", "is_delete_marker": True, "size": None},
        {**template, "key": "out/parts/run-000001/part-000000.parquet"},  # DEST inside SOURCE: excluded
        {**template, "key": "held/imgs/x.png"},  # the quarantine: excluded
    ]


def write_report(s3, inv_bucket: str, source_bucket: str, rows: list[dict], fmt: str, files: int = 2) -> str:
    """Write an inventory report of ``rows`` in ``fmt`` to ``inv_bucket``; returns the manifest's s3:// URL."""
    base = f"inventory/{source_bucket}/daily"
    table = pa.Table.from_pylist(rows).cast(
        pa.schema(
            [
                ("bucket", pa.string()),
                ("key", pa.string()),
                ("version_id", pa.string()),
                ("is_latest", pa.bool_()),
                ("is_delete_marker", pa.bool_()),
                ("size", pa.int64()),
                ("last_modified_date", pa.timestamp("ms")),
                ("e_tag", pa.string()),
                ("storage_class", pa.string()),
            ]
        )
    )
    entries = []
    step = -(-len(rows) // files)
    for i in range(files):
        part = table.slice(i * step, step)
        if fmt == "CSV":
            lines = []
            for r in part.to_pylist():
                modified = r["last_modified_date"].strftime("%Y-%m-%dT%H:%M:%S.000Z")
                values = [r["bucket"], quote_plus(r["key"], safe="/"), r["version_id"] or ""]
                values += [str(r["is_latest"]).lower(), str(r["is_delete_marker"]).lower(), str(r["size"] or "")]
                values += [modified, r["e_tag"], r["storage_class"]]
                lines.append(",".join(f'"{v}"' for v in values))
            data, name = gzip.compress(("\n".join(lines) + "\n").encode()), f"{i}.csv.gz"
        else:
            buf = io.BytesIO()
            (pq.write_table if fmt == "Parquet" else orc.write_table)(part, buf)
            data, name = buf.getvalue(), f"{i}.{fmt.lower()}"
        key = f"{base}/data/{name}"
        s3.put_object(Bucket=inv_bucket, Key=key, Body=data)
        entries.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    schema = CSV_SCHEMA if fmt == "CSV" else "(not read for ORC and Parquet)"
    manifest = {
        "sourceBucket": source_bucket,
        "destinationBucket": f"arn:aws:s3:::{inv_bucket}",
        "version": "2016-11-30",
        "creationTimestamp": "1514944800000",
        "fileFormat": fmt,
        "fileSchema": schema,
        "files": entries,
    }
    key = f"{base}/2026-12-01T00-00Z/manifest.json"
    s3.put_object(Bucket=inv_bucket, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{inv_bucket}/{key}"


@pytest.fixture(name="bucket_with_images")
def bucket_fixture(s3):
    bucket = new_bucket(s3)
    images = {f"imgs/{i:03d}.png": png(900 + i) for i in range(40)}
    images["imgs/sp ace+plus%.png"] = png(990)  # CSV keys are URL-encoded: a space is '+', a plus '%2B'
    images["imgs/ü 名前.png"] = png(991)
    put_many(s3, bucket, {**images, "imgs/notes.txt": b"not an image", "other/x.png": png(992)})
    return bucket, images


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("fmt", ["CSV", "ORC", "Parquet"])
def test_inventory_lists_what_list_does(s3, s3_endpoint, capsys, bucket_with_images, fmt):
    bucket, images = bucket_with_images
    inv = new_bucket(s3)
    rows = listed(s3, bucket)
    manifest = write_report(s3, inv, bucket, rows + noise(bucket, rows[0]), fmt)
    dest, held = f"s3://{bucket}/out/", f"s3://{bucket}/held/"
    args = ("s3://" + bucket + "/imgs/", "--output", dest, "--endpoint-url", s3_endpoint, "--quarantine", held)

    rc, out = scan(capsys, *args, "--inventory", manifest)
    assert rc == 0, out
    assert out["scanned"] == len(images) and out["skipped_non_image"] == 1 and out["errors"] == 0
    got = rows_by_key(dest, s3_endpoint)
    assert set(got) == set(images)  # nothing outside imgs/, of another bucket, noncurrent, deleted, DEST or held/
    etags = {r["key"]: r["e_tag"] for r in rows}
    assert all(got[k]["etag"] == etags[k] for k in images)

    # the same bucket listed by LIST: the same rows, the same verdicts
    listed_dest = f"s3://{bucket}/out-list/"
    rc, out = scan(capsys, "s3://" + bucket + "/imgs/", "--output", listed_dest, "--endpoint-url", s3_endpoint)
    assert rc == 0 and out["scanned"] == len(images)
    by_list = rows_by_key(listed_dest, s3_endpoint)
    assert {k: (r["etag"], r["nsfw"], r["concept_scores"]) for k, r in by_list.items()} == {
        k: (r["etag"], r["nsfw"], r["concept_scores"]) for k, r in got.items()
    }

    rc, out = scan(capsys, *args, "--inventory", manifest)  # nothing changed: nothing read
    assert rc == 0 and out["scanned"] == 0 and out["skipped_unchanged"] == len(images)
    assert out["skipped_non_image"] == 1


@pytest.mark.usefixtures("ray_cluster")
def test_inventory_rerun_sees_changes_in_a_new_report(s3, s3_endpoint, capsys, bucket_with_images):
    bucket, images = bucket_with_images
    inv = new_bucket(s3)
    dest = f"s3://{bucket}/out/"
    args = ("s3://" + bucket + "/imgs/", "--output", dest, "--endpoint-url", s3_endpoint)
    rc, out = scan(capsys, *args, "--inventory", write_report(s3, inv, bucket, listed(s3, bucket), "Parquet"))
    assert rc == 0 and out["scanned"] == len(images)
    before = rows_by_key(dest, s3_endpoint)

    s3.put_object(Bucket=bucket, Key="imgs/000.png", Body=png(4242))  # rewritten
    s3.put_object(Bucket=bucket, Key="imgs/new.png", Body=png(4343))  # new
    s3.delete_object(Bucket=bucket, Key="imgs/001.png")  # gone
    rc, out = scan(capsys, *args, "--inventory", write_report(s3, inv, bucket, listed(s3, bucket), "Parquet"))
    assert rc == 0 and out["scanned"] == 2 and out["skipped_unchanged"] == len(images) - 2
    after = rows_by_key(dest, s3_endpoint)
    assert set(after) == set(images) - {"imgs/001.png"} | {"imgs/new.png"}  # the compaction follows the report
    assert after["imgs/000.png"]["etag"] != before["imgs/000.png"]["etag"]


@pytest.mark.usefixtures("ray_cluster")
def test_inventory_fails_closed(s3, s3_endpoint, capsys, bucket_with_images, tmp_path):
    bucket, _ = bucket_with_images
    inv = new_bucket(s3)
    manifest = write_report(s3, inv, bucket, listed(s3, bucket), "Parquet")
    dest = f"s3://{bucket}/out/"
    args = ("s3://" + bucket + "/imgs/", "--output", dest, "--endpoint-url", s3_endpoint)

    data_key = f"inventory/{bucket}/daily/data/0.parquet"
    s3.put_object(Bucket=inv, Key=data_key, Body=b"PAR1 not what the manifest's MD5 names")
    rc, out = scan(capsys, *args, "--inventory", manifest)
    assert rc == 1 and out is None  # an inventory file that does not match its MD5checksum stops the scan
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="out/")  # nothing committed

    from pipeline.errors import InvalidInput
    from pipeline.scan.inventory import check_source, load_manifest
    from pipeline.storage import parse_location

    other = write_report(s3, inv, "some-other-bucket", listed(s3, bucket), "Parquet")
    rc, out = scan(capsys, *args, "--inventory", other)
    assert rc == 2 and out is None  # a report of another bucket: a usage error, nothing read
    with pytest.raises(InvalidInput, match="bucket 'some-other-bucket', not of SOURCE's bucket"):
        check_source(load_manifest(other, s3_endpoint), parse_location(args[0], s3_endpoint))

    (tmp_path / "manifest.json").write_text(json.dumps({"fileFormat": "XLS", "files": []}))
    rc, out = scan(capsys, *args, "--inventory", str(tmp_path / "manifest.json"))
    assert rc == 2 and out is None
    with pytest.raises(InvalidInput, match="fileFormat 'XLS', expected one of"):
        load_manifest(str(tmp_path / "manifest.json"))
