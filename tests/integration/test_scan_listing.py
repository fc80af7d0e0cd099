"""Listing an S3 SOURCE by prefix fan-out (parallel Ray tasks) over moto: exactly the sequential paginator's listing.

Every key once, whatever its shape (``//``, a trailing ``/``, ``%``, ``+``, XML characters, non-ASCII, a key equal to
a prefix), objects at every level, DEST and the quarantine left out, latest versions only in a versioned bucket, and
no key twice while objects are added during the listing. The whole scan gives the same results either way.
"""

from __future__ import annotations

import threading

import pytest

from tests.integration.scan_support import (
    new_bucket,
    png,
    put_many,
    rows_by_key,
    scan,
)

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

ODD = [
    "src//double",
    "src/a//b",
    "src/a/",  # a key ending in '/' with content: an object, not a folder marker
    "src/a",  # a key equal to a prefix without its '/'
    "src/pct%2F%zz.png",
    "src/plus+and space.png",
    "src/x&y<z>'q\".png",
    "src/ünïcode/名前.png",
    "src/n/m/l/k/j/deep.png",
    "src/out-not-dest/kept.png",  # shares a name's start with DEST ("out/"), not its prefix
]


def fill(s3, bucket: str) -> set[str]:
    """A bucket with nested prefixes, many top-level prefixes, objects at every level, odd keys, folder markers,
    DEST and the quarantine inside SOURCE and objects outside it. Returns the keys a listing of SOURCE must hold."""
    keys = {f"src/p{i:03d}/obj{j}.png" for i in range(40) for j in range(3)}  # many top-level prefixes
    keys |= {f"src/n/{a}/{b}/leaf{c}" for a in "abc" for b in "xyz" for c in range(2)}  # nested
    keys |= {"src/top.png", "src/n/mid.png", "src/n/a/lower.png", "src/n/a/x/lowest.png"}  # objects at every level
    keys |= set(ODD)
    objects = {k: k.encode() for k in keys}
    markers = {"src/empty-folder/": b"", "src/n/": b""}  # folder markers: never objects
    hidden = {"src/out/parts/run-1/part-0.parquet": b"x", "src/out/_diffguard_scan.json": b"{}", "src/held/x.png": b"x"}
    outside = {"other/x.png": b"x", "srcx/y.png": b"y", "src": b"z"}
    put_many(s3, bucket, {**objects, **markers, **hidden, **outside})
    return keys


def source_of(bucket: str, endpoint: str):
    from pipeline.scan.plan import ScanConfig, layout

    cfg = ScanConfig(f"s3://{bucket}/src", f"s3://{bucket}/src/out", endpoint_url=endpoint, quarantine="src/held")
    source, _, _, exclude = layout(cfg)
    assert sorted(exclude) == ["src/held/", "src/out/"]
    return source, exclude


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("versioned", [False, True])
def test_fanout_listing_equals_the_sequential_paginator(s3, s3_endpoint, versioned):
    from pipeline.scan.job import fanout_listing
    from pipeline.scan.listing import partition
    from pipeline.scan.plan import list_source

    bucket = new_bucket(s3)
    if versioned:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    expected = fill(s3, bucket)
    if versioned:  # a second version of some objects, and some deleted (only a delete marker is latest)
        put_many(s3, bucket, {k: b"v2" for k in ["src/p000/obj0.png", "src/a//b", "src/n/a/x/lowest.png"]})
        for key in ["src/p001/obj1.png", "src/n/c/z/leaf0", "src//double"]:
            s3.delete_object(Bucket=bucket, Key=key)
            expected.discard(key)
    source, exclude = source_of(bucket, s3_endpoint)

    sequential, symlinks = list_source(source, exclude)
    fanned, tasks = fanout_listing(source, exclude, parallelism=4, fanout_min=0)
    assert symlinks == 0 and tasks > 1
    assert fanned.schema == sequential.schema
    assert fanned.to_pylist() == sequential.to_pylist()  # same rows (etag, size, time, version id), same order
    assert set(fanned["key"].to_pylist()) == expected and fanned.num_rows == len(expected)
    assert all(v is not None for v in fanned["version_id"].to_pylist()) == versioned

    whole, none = fanout_listing(source, exclude, parallelism=64, fanout_min=0)  # the tree ends before 256 prefixes
    assert none == 0 and whole.to_pylist() == sequential.to_pylist()  # all listed by the partition itself

    split = partition(source.store, source.prefix, 16, exclude, 4, versioned)  # what the tasks above listed
    assert len(split.prefixes) >= 16 and split.objects  # descended past the first level; objects found on the way
    assert not any(a != b and b.startswith(a) for a in split.prefixes for b in split.prefixes)  # no prefix nests
    assert not any(p.startswith(e) for p in split.prefixes for e in exclude)  # DEST and the quarantine: never listed
    if versioned:
        rewritten = next(r for r in fanned.to_pylist() if r["key"] == "src/a//b")
        assert (
            rewritten["size"] == 2
            and rewritten["version_id"] == s3.head_object(Bucket=bucket, Key="src/a//b")["VersionId"]
        )


@pytest.mark.usefixtures("ray_cluster")
def test_objects_added_while_listing_appear_at_most_once(s3, s3_endpoint):
    from pipeline.scan.job import fanout_listing

    bucket = new_bucket(s3)
    expected = fill(s3, bucket)
    source, exclude = source_of(bucket, s3_endpoint)
    added: list[str] = []
    stop = threading.Event()

    def writer() -> None:  # new objects in existing prefixes, at the top level and in new prefixes, until done
        i = 0
        while not stop.is_set():
            key = [f"src/p{i % 40:03d}/new{i}.png", f"src/new{i}.png", f"src/q{i:04d}/new.png", f"src/n/a/new{i}"][
                i % 4
            ]
            s3.put_object(Bucket=bucket, Key=key, Body=b"new")
            added.append(key)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        listed, tasks = fanout_listing(source, exclude, parallelism=2, fanout_min=0)
    finally:
        stop.set()
        thread.join()
    keys = listed["key"].to_pylist()
    assert tasks > 1 and added  # the writer ran during the listing
    assert len(keys) == len(set(keys))  # never twice
    assert expected <= set(keys) <= expected | set(added)  # every object that was there; new ones may or may not be


@pytest.mark.usefixtures("ray_cluster")
def test_a_failing_listing_task_fails_the_listing_with_the_stores_message(s3, s3_endpoint):
    """Tasks whose LIST calls keep failing (after botocore's retries) fails the listing with the store's own error,
    as the sequential paginator does: the CLI turns it into exit 1 and one line (see test_scan_faults)."""
    from pipeline.errors import StorageError
    from pipeline.scan.job import fanout_listing
    from pipeline.storage import Location, S3Store
    from tests.faultproxy import FaultProxy

    bucket = new_bucket(s3)
    fill(s3, bucket)

    def hook(method: str, path: str) -> str | None:  # the tasks' listings (the partition's are delimited)
        return "500" if "list-type=2" in path and "delimiter" not in path else None

    with FaultProxy(s3_endpoint, rate=0.0, hook=hook) as proxy:
        source = Location(S3Store(bucket, proxy.url), "src/")
        with pytest.raises(StorageError) as err:
            fanout_listing(source, [], parallelism=2, fanout_min=0)
    assert type(err.value) is StorageError  # the store's error itself, not Ray's wrapper of it
    message = str(err.value)
    assert message.startswith(f"cannot list s3://{bucket}/src/") and "InternalError" in message, message
    assert "\n" not in message
    assert proxy.counts["500"] >= 2  # retried before giving up


def scan_rows(dest: str, endpoint: str) -> dict[str, tuple]:
    rows = rows_by_key(dest, endpoint)
    fields = ("etag", "size", "version_id", "nsfw", "flagged", "error_kind", "bad_concepts")
    return {k: tuple(r[f] for f in fields) for k, r in rows.items()}


@pytest.mark.usefixtures("ray_cluster")
def test_scan_with_fanout_listing_equals_the_sequential_scan(s3, s3_endpoint, capsys):
    from pipeline.scan import ScanConfig, run_scan
    from pipeline.spec import CheckerSpec

    bucket = new_bucket(s3)
    images = {f"src/d{i % 20:02d}/{i:02d}.png": png(300 + i) for i in range(24)}  # more prefixes than 4 x 4 tasks
    images |= {"src/top.png": png(398), "src/d00/x/deeper.png": png(399)}
    images["src/top.png"] = png(399)
    put_many(s3, bucket, {**images, "src/a/readme.txt": b"not an image", "src/b/": b""})
    source, seq_dest, fan_dest = f"s3://{bucket}/src", f"s3://{bucket}/res-seq", f"s3://{bucket}/res-fan"

    rc, sequential = scan(
        capsys, source, "--output", seq_dest, "--endpoint-url", s3_endpoint, "--list-parallelism", "1"
    )
    assert rc == 0 and sequential["scanned"] == len(images) and sequential["skipped_non_image"] == 1

    spec = CheckerSpec(device="cpu", dtype="float32")
    cfg = ScanConfig(source, fan_dest, checker=spec, endpoint_url=s3_endpoint, list_parallelism=4, list_fanout_min=0)
    fanned = run_scan(cfg)
    assert fanned.listing_tasks > 1
    assert fanned.as_json() == {**sequential, "output": fan_dest}
    assert scan_rows(fan_dest, s3_endpoint) == scan_rows(seq_dest, s3_endpoint)

    rerun = run_scan(cfg)  # nothing changed: every row the fan-out listing gives matches what it recorded
    assert rerun.listing_tasks > 1 and rerun.scanned == 0 and rerun.skipped_unchanged == len(images)


def test_list_parallelism_usage_error(capsys):
    from pipeline.cli import main

    for bad in ("0", "-3", "two", "1.5"):
        with pytest.raises(SystemExit) as exc:
            main(["scan", "s3://bucket/src", "--output", "s3://bucket/out", "--list-parallelism", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --list-parallelism: expected a positive integer, got" in err and bad in err, err


def test_groups_are_contiguous_and_never_span_an_excluded_prefix():
    from pipeline.scan.listing import Partition

    split = Partition([], ["a/", "b/", "c/", "out-x/", "p/", "q/"])
    assert split.groups(2, []) == [["a/", "b/", "c/"], ["out-x/", "p/", "q/"]]
    assert split.groups(2, ["out/"]) == [["a/", "b/", "c/"], ["out-x/"], ["p/", "q/"]]  # "out-x/" < "out/" < "p/"
    assert split.groups(50, []) == [[p] for p in split.prefixes]
    assert Partition([], []).groups(4, ["out/"]) == []  # the tree ended during the partition: no task
