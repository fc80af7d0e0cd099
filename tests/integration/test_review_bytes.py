"""Decisions bound to the bytes a person saw, in moto (versioned and unversioned buckets): the U -> S -> U swap.

The attack: upload an unsafe image U; a scan flags it; swap in a harmless S; a reviewer is shown S and overturns; upload
U again (in an unversioned bucket its ETag is U's MD5 again, equal to the one overturned): ``--apply`` must still
withhold U. Here the review app never shows S as the scanned object (409 "changed since the scan: rescan first"),
no decision can be recorded on it, and an overturn of S made after a rescan is not U's.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

import httpx
import pytest

from pipeline.errors import ObjectChanged
from pipeline.storage import S3Store
from tests.integration.review_support import ReviewServer
from tests.integration.scan_support import all_keys, body, new_bucket, png, rows_by_key, scan

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: deselected by `make test-fast`
U, S = png(901, (24, 32)), png(902, (24, 32))
FLAG_ALL = "1"  # the strictest adjustment: flags every readable image with the tiny checker


def _bucket(s3, versioned: bool) -> str:
    bucket = new_bucket(s3)
    if versioned:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


@pytest.mark.parametrize("versioned", [False, True], ids=["unversioned", "versioned"])
def test_s3_reads_are_pinned_to_the_scanned_version(s3, s3_endpoint, versioned):
    bucket = _bucket(s3, versioned)
    store = S3Store(bucket, s3_endpoint)
    s3.put_object(Bucket=bucket, Key="a.png", Body=U)
    scanned = store.head("a.png")
    s3.put_object(Bucket=bucket, Key="a.png", Body=S)
    if versioned:
        assert store.read("a.png", scanned)[0] == U  # that version, whatever was written since
    else:
        with pytest.raises(ObjectChanged, match="changed since it was scanned"):
            store.read("a.png", scanned)  # If-Match on the ETag: 412
    s3.put_object(Bucket=bucket, Key="a.png", Body=U)
    again = store.head("a.png")
    assert (
        again.etag == scanned.etag
    )  # an ETag is the bytes' MD5: it repeats, so only the sha256 of what was seen binds
    assert (again.version_id != scanned.version_id) if versioned else again.version_id is None


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("versioned", [False, True], ids=["unversioned", "versioned"])
def test_a_swap_between_scan_review_and_apply_leaves_the_scanned_bytes_withheld(s3, s3_endpoint, capsys, versioned):
    bucket = _bucket(s3, versioned)
    key, dest, held = "up/u.png", f"s3://{bucket}/_scan", f"s3://{bucket}/held/"
    args = (f"s3://{bucket}/up", "--output", dest, "--endpoint-url", s3_endpoint, "--adjustment", FLAG_ALL)
    s3.put_object(Bucket=bucket, Key=key, Body=U)
    rc, out = scan(capsys, *args)
    assert rc == 0 and out["flagged"] == 1
    s3.put_object(Bucket=bucket, Key=key, Body=S)  # the swap, after the scan

    with ReviewServer(dest, "--endpoint-url", s3_endpoint) as app:
        item = f"{app.url}/api/items/{quote(key, safe='')}"
        shown = httpx.get(item + "/thumbnail", params={"reveal": 1}, headers=app.headers)
        overturn = httpx.post(item + "/decision", json={"decision": "overturn"}, headers=app.headers)
        assert shown.status_code == 409 and "changed since the scan: rescan first" in shown.text  # never S's pixels
        assert overturn.status_code == 409 and "rescan first" in overturn.text
        assert httpx.get(app.url + "/api/decisions", headers=app.headers).json() == []

    rc, out = scan(capsys, *args)  # the rescan scores S (flagged too at this adjustment)
    assert rc == 0 and rows_by_key(dest, s3_endpoint)[key]["sha256"] == hashlib.sha256(S).hexdigest()
    with ReviewServer(dest, "--endpoint-url", s3_endpoint) as app:  # the reviewer sees S and overturns it: right
        item = f"{app.url}/api/items/{quote(key, safe='')}"
        assert httpx.get(item + "/thumbnail", headers=app.headers).status_code == 200
        r = httpx.post(item + "/decision", json={"decision": "overturn"}, headers=app.headers)
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(S).hexdigest()

    s3.put_object(Bucket=bucket, Key=key, Body=U)  # U again: in an unversioned bucket, its first ETag again
    rc, out = scan(capsys, *args, "--quarantine", held, "--apply")
    assert rc == 0
    assert key not in all_keys(s3, bucket, "up/") and body(s3, bucket, "held/" + key) == U  # U withheld
    row = rows_by_key(dest, s3_endpoint)[key]
    assert row["sha256"] == hashlib.sha256(U).hexdigest() and row["quarantined_to"] == f"s3://{bucket}/held/{key}"
