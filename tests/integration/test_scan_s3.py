"""`diffguard scan` over a real S3 API (moto's server over HTTP) with the session's local Ray."""

from __future__ import annotations

import logging

import pytest

from tests.integration.scan_support import (
    all_keys,
    body,
    checker_at,
    mixed_adjustment,
    new_bucket,
    png,
    put_many,
    results_layout,
    rows_by_key,
    scan,
    summary,
)

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

TOL = 1.1e-3  # scores are rounded to 3 decimals; a batch of different size may round the last digit differently


def assert_scores_match(rows: dict, images: dict[str, bytes], checker) -> None:
    """Every scored row equals the in-process core checker's verdict on the same bytes."""
    keys = sorted(images)
    for key, verdict in zip(keys, checker.check([images[k] for k in keys]), strict=True):
        row = rows[key]
        assert row["error"] is None, (key, row["error"])
        assert row["nsfw"] == verdict.nsfw, key
        assert row["bad_concepts"] == verdict.bad_concepts, key
        assert row["bad_concept_names"] == verdict.bad_concept_names, key
        assert row["special_care"] == verdict.special_care, key
        assert row["concept_scores"] == pytest.approx(verdict.concept_scores, abs=TOL), key
        assert row["special_scores"] == pytest.approx(verdict.special_scores, abs=TOL), key
        assert row["model_fingerprint"] == checker.fingerprint


@pytest.mark.usefixtures("ray_cluster")
def test_bucket_past_one_page_with_awkward_objects(s3, s3_endpoint, capsys, checker):
    bucket = new_bucket(s3)
    folders = ["imgs/a/", "imgs/a/b/", "imgs/c d/"]
    images = {f"{folders[i % 3]}{i:04d}.png": png(i, (6 + i % 5, 7)) for i in range(1000)}
    images["imgs/ünïcode/fïlé 名前.png"] = png(5001)
    images["imgs/with space/x  y.JPG"] = png(5002)
    broken = {
        "imgs/zero.png": b"",
        "imgs/corrupt.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "imgs/a/truncated.png": png(5003)[:60],
    }
    others = {"imgs/readme.txt": b"hello", "imgs/a/b/meta.json": b"{}", "imgs/a/": b"", "imgs/empty dir/": b""}
    put_many(s3, bucket, {**images, **broken, **others, "elsewhere/outside.png": png(5004)})
    dest = f"s3://{bucket}/imgs/_results"  # inside the source: must never be scanned itself

    rc, out = scan(capsys, f"s3://{bucket}/imgs", "--output", dest, "--endpoint-url", s3_endpoint)
    assert rc == 0
    flagged = out["flagged"]
    assert out == summary(1005, 0, 2, flagged, 3, dest)

    rows = rows_by_key(dest, s3_endpoint)
    assert set(rows) == set(images) | set(broken)  # every object once; folder markers, non-images, outside: none
    assert flagged == sum(r["nsfw"] for r in rows.values()) + len(broken)  # unscorable objects are withheld too
    assert all(rows[k]["flagged"] and rows[k]["action"] == "block" for k in broken)
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="imgs/ü")["Contents"][0]
    assert rows[listing["Key"]]["etag"] == listing["ETag"].strip('"')
    for key, row in rows.items():
        assert row["bucket"] == bucket and row["size"] == len({**images, **broken}[key])
    assert_scores_match(rows, images, checker)
    assert "empty file" in rows["imgs/zero.png"]["error"]
    assert "corrupt or truncated" in rows["imgs/corrupt.jpg"]["error"]
    assert "corrupt or truncated" in rows["imgs/a/truncated.png"]["error"]
    assert {rows[k]["error_kind"] for k in broken} == {"decode"}

    rc, out = scan(capsys, f"s3://{bucket}/imgs/", "--output", dest, "--endpoint-url", s3_endpoint)
    assert rc == 0 and out == summary(0, 1005, 2, 0, 0, dest)  # nothing rescored, pagination again
    assert rows_by_key(dest, s3_endpoint) == rows
    # one Delta commit per completed run, a data file only where a row changed (none here); the parts are gone
    layout = results_layout(all_keys(s3, bucket, "imgs/_results/"), "imgs/_results/")
    assert layout == {"manifest": 1, "commits": 2, "data": 1, "other": 0}


@pytest.mark.usefixtures("ray_cluster")
def test_incremental_reruns(s3, s3_endpoint, capsys):
    bucket = new_bucket(s3)
    images = {f"in/{i}.png": png(100 + i) for i in range(12)}
    put_many(s3, bucket, {**images, "in/bad.webp": b"RIFF\x00\x00\x00\x00WEBPjunk"})
    s3.put_object(Bucket=bucket, Key="in/cold.png", Body=png(300), StorageClass="GLACIER")  # GET fails: archived
    src, dest = f"s3://{bucket}/in", f"s3://{new_bucket(s3)}/out"
    args = (src, "--output", dest, "--endpoint-url", s3_endpoint)

    rc, out = scan(capsys, *args)
    assert rc == 0 and out == summary(14, 0, 0, out["flagged"], 2, dest)  # bad objects never fail the job
    first = rows_by_key(dest, s3_endpoint)
    assert first["in/bad.webp"]["error_kind"] == "decode"
    cold = first["in/cold.png"]
    assert cold["error_kind"] == "read" and "InvalidObjectState" in cold["error"] and cold["sha256"] is None
    assert out["flagged"] == sum(r["nsfw"] for r in first.values()) + 1  # bad.webp: unscorable, withheld
    assert (cold["action"], cold["flagged"]) == (None, False)  # a read error is never acted on

    rc, out = scan(capsys, *args)
    assert out == summary(1, 13, 0, 0, 1, dest)  # nothing rescored but the read error; the decode error is not retried
    second = rows_by_key(dest, s3_endpoint)
    assert all(second[k] == first[k] for k in first if k != "in/cold.png")

    s3.restore_object(Bucket=bucket, Key="in/cold.png", RestoreRequest={"Days": 1})  # readable now, same etag
    s3.put_object(Bucket=bucket, Key="in/0.png", Body=png(999))  # changed
    s3.put_object(Bucket=bucket, Key="in/new.png", Body=png(998))  # new
    s3.delete_object(Bucket=bucket, Key="in/1.png")  # gone
    rc, out = scan(capsys, *args)
    assert rc == 0 and out == summary(3, 11, 0, out["flagged"], 0, dest)  # exactly the changed objects (+ the retry)
    third = rows_by_key(dest, s3_endpoint)
    assert set(third) == (set(first) - {"in/1.png"}) | {"in/new.png"}
    assert third["in/cold.png"]["error"] is None and third["in/cold.png"]["etag"] == cold["etag"]
    assert third["in/0.png"]["etag"] != first["in/0.png"]["etag"]
    assert third["in/0.png"]["scanned_at"] > first["in/0.png"]["scanned_at"]
    assert all(third[k] == first[k] for k in first if k not in ("in/0.png", "in/1.png", "in/cold.png"))

    stricter = (*args, "--adjustment", "0.05")  # a new fingerprint: everything is rescored
    rc, out = scan(capsys, *stricter)
    assert out == summary(14, 0, 0, out["flagged"], 1, dest)
    fourth = rows_by_key(dest, s3_endpoint)
    assert len({r["model_fingerprint"] for r in fourth.values()}) == 1
    assert fourth["in/2.png"]["model_fingerprint"] != third["in/2.png"]["model_fingerprint"]
    assert out["flagged"] == sum(r["nsfw"] for r in fourth.values()) + 1

    assert scan(capsys, *stricter)[1] == summary(0, 14, 0, 0, 0, dest)
    assert scan(capsys, *stricter, "--full")[1] == summary(14, 0, 0, out["flagged"], 1, dest)


def _scored_bucket(s3, s3_endpoint, capsys, checker, n: int, extra: tuple[str, ...] = ()):
    """A bucket of n images, scanned once at an adjustment that flags some of them. Returns what the tests need."""
    bucket = new_bucket(s3)
    images = {f"up/{i:02d} é.png": png(400 + i) for i in range(n)}
    put_many(s3, bucket, images)
    adjustment = mixed_adjustment(checker, list(images.values()))
    expected = {k: v.nsfw for k, v in zip(images, checker_at(adjustment).check(list(images.values())), strict=True)}
    flagged = {k for k, nsfw in expected.items() if nsfw}
    assert 0 < len(flagged) < n
    dest = f"s3://{bucket}-r/scan"
    s3.create_bucket(Bucket=f"{bucket}-r")
    args = (f"s3://{bucket}", "--output", dest, "--endpoint-url", s3_endpoint, "--adjustment", str(adjustment))
    rc, out = scan(capsys, *args, *extra)
    assert rc == 0 and out == summary(n, 0, 0, len(flagged), 0, dest)
    assert {k: r["nsfw"] for k, r in rows_by_key(dest, s3_endpoint).items()} == expected
    return bucket, images, flagged, dest, args


@pytest.mark.usefixtures("ray_cluster")
def test_actions_dry_run_then_apply(s3, s3_endpoint, capsys, checker, caplog):
    caplog.set_level(logging.INFO)
    bucket, images, flagged, dest, args = _scored_bucket(s3, s3_endpoint, capsys, checker, 10, ("--tag",))
    keep = sorted(flagged)[0]
    s3.put_object_tagging(Bucket=bucket, Key=keep, Tagging={"TagSet": [{"Key": "team", "Value": "a"}]})

    def tags(key):
        return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}

    assert f"would tag {len(flagged)} withheld objects" in caplog.text
    assert all(tags(k) == ({"team": "a"} if k == keep else {}) for k in images)  # the dry run tagged nothing
    rc, out = scan(capsys, *args, "--tag", "--apply")
    assert rc == 0 and out == summary(0, 10, 0, 0, 0, dest)  # acts on the current view, nothing rescored
    for key in images:
        expected = {"moderation": "nsfw"} if key in flagged else {}
        assert tags(key) == ({"team": "a"} | expected if key == keep else expected)  # other tags are kept
    assert {k for k, r in rows_by_key(dest, s3_endpoint).items() if r["tagged"]} == flagged

    rc, out = scan(capsys, *args, "--quarantine", "q/")
    assert rc == 0 and all_keys(s3, bucket) == set(images)  # a dry run moves nothing
    assert f"would quarantine {len(flagged)} withheld objects" in caplog.text

    rc, out = scan(capsys, *args, "--quarantine", "q/", "--apply")
    assert rc == 0 and out == summary(0, 10, 0, 0, 0, dest)
    assert all_keys(s3, bucket) == (set(images) - flagged) | {f"q/{k}" for k in flagged}
    for key in flagged:
        assert body(s3, bucket, f"q/{key}") == images[key]  # the same bytes, now in quarantine
    rows = rows_by_key(dest, s3_endpoint)
    assert len(rows) == 10  # quarantined objects keep their row
    assert {k: r["quarantined_to"] for k, r in rows.items() if r["quarantined_to"]} == {
        k: f"s3://{bucket}/q/{k}" for k in flagged
    }
    assert all_keys(s3, f"{bucket}-r", "scan/_quarantine/") == set()  # no move left in flight

    rc, out = scan(capsys, *args, "--quarantine", "q/", "--apply")  # idempotent; q/ inside the source is not scanned
    assert out == summary(0, 10 - len(flagged), 0, 0, 0, dest)
    assert all_keys(s3, bucket) == (set(images) - flagged) | {f"q/{k}" for k in flagged}
    assert rows_by_key(dest, s3_endpoint) == rows


class Died(BaseException):
    """The job dying at a chosen point (a BaseException, so nothing in the scan handles it)."""


@pytest.mark.usefixtures("ray_cluster")
def test_quarantine_never_loses_an_object_when_the_job_dies(s3, s3_endpoint, capsys, checker, monkeypatch, caplog):
    from pipeline import storage
    from pipeline.cli import main
    from pipeline.scan import state as scan_state

    caplog.set_level(logging.INFO)
    bucket, images, flagged, dest, args = _scored_bucket(s3, s3_endpoint, capsys, checker, 8)
    quarantine = ("--quarantine", f"s3://{bucket}-q/held")
    s3.create_bucket(Bucket=f"{bucket}-q")
    journal = f"{bucket}-r"  # DEST's bucket

    def everything_is_somewhere():
        source, held = all_keys(s3, bucket), all_keys(s3, f"{bucket}-q")
        for key, data in images.items():
            copies = [body(s3, bucket, key)] if key in source else []
            copies += [body(s3, f"{bucket}-q", f"held/{key}")] if f"held/{key}" in held else []
            assert data in copies, f"{key} was lost"

    def dies_in(cls, name, when):
        real = getattr(cls, name)

        def fake(self, *a, **kw):
            if when(self, *a):
                raise Died
            return real(self, *a, **kw)

        monkeypatch.setattr(cls, name, fake)
        return lambda: monkeypatch.setattr(cls, name, real)

    # 1. the job dies after copying, before deleting any original
    undo = dies_in(storage.S3Store, "delete", lambda store, key, etag=None: store.bucket == bucket)
    with pytest.raises(Died):
        main(["scan", *args, *quarantine, "--apply", "--json"])
    undo()
    everything_is_somewhere()
    assert all_keys(s3, bucket) == set(images)
    assert len(all_keys(s3, journal, "scan/_quarantine/")) == len(flagged)  # the moves in flight are journalled

    rc, out = scan(capsys, *args, *quarantine)  # a dry run finishes nothing and deletes nothing
    assert rc == 0 and out["scanned"] == 0 and all_keys(s3, bucket) == set(images)
    assert "an interrupted quarantine" in caplog.text and "is pending" in caplog.text

    # 2. the rerun dies after deleting the originals, before their rows are committed
    undo = dies_in(scan_state.PartWriter, "commit", lambda w, table: table["quarantined_to"].null_count == 0)
    with pytest.raises(Died):
        main(["scan", *args, *quarantine, "--apply", "--json"])
    undo()
    assert all_keys(s3, bucket) == set(images) - flagged
    everything_is_somewhere()
    assert not any(r["quarantined_to"] for r in rows_by_key(dest, s3_endpoint).values())

    rc, out = scan(capsys, *args)  # any next run, even without an action, records the finished moves
    assert rc == 0 and out == summary(0, 8 - len(flagged), 0, 0, 0, dest)
    rows = rows_by_key(dest, s3_endpoint)
    assert len(rows) == 8
    assert {k: r["quarantined_to"] for k, r in rows.items() if r["quarantined_to"]} == {
        k: f"s3://{bucket}-q/held/{k}" for k in flagged
    }
    assert all_keys(s3, journal, "scan/_quarantine/") == set()
    assert all_keys(s3, f"{bucket}-q") == {f"held/{k}" for k in flagged}
    everything_is_somewhere()


def test_no_access_and_bad_arguments(s3, s3_endpoint, capsys, caplog, tmp_path):
    from pipeline.cli import main

    def run(*args):
        capsys.readouterr()
        return main(["scan", *args])

    rc = run("s3://no-such-bucket-here/x", "--output", str(tmp_path / "o"), "--endpoint-url", s3_endpoint, "--json")
    assert rc == 1 and capsys.readouterr().out == ""
    assert "s3://no-such-bucket-here/x/" in caplog.text and "NoSuchBucket" in caplog.text
    assert "credentials from boto3's 'env' provider" in caplog.text and s3_endpoint in caplog.text

    bucket = new_bucket(s3)
    src, out = f"s3://{bucket}/a", str(tmp_path / "o")
    for argv in (
        (src, "--output", out, "--quarantine", "q/", "--tag"),  # one action at a time
        (src, "--output", out, "--batch-size", "0"),
        (src, "--output", out, "--num-gpus", "-1"),
        (src, "--output", out, "--adjustment", "2"),
        (src,),  # --output is required
    ):
        with pytest.raises(SystemExit) as exc:
            run(*argv)
        assert exc.value.code == 2, argv
    assert run(src, "--output", out, "--apply") == 2  # --apply without an action
    assert run(str(tmp_path), "--output", out, "--tag") == 2  # tags need S3
    assert run(str(tmp_path / "missing"), "--output", out) == 2
    assert run(src, "--output", src, "--endpoint-url", s3_endpoint) == 2  # DEST must not be SOURCE
    assert run(src, "--output", "gs://elsewhere/x") == 2
