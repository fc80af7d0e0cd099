"""The scan under faults (drivers in ``tests/reliability/scan_faults.py``): SIGKILLed at random points over ten
trials and rerun, and run through a proxy injecting transient S3 faults. After each: one current row per object,
every object present exactly once (quarantine included), every object scored with the in-process verdict."""

from __future__ import annotations

import pytest

from tests.integration.scan_support import (
    checker_at,
    mixed_adjustment,
    png,
)
from tests.reliability.scan_faults import faulty_s3_scan, sigkill_trials

pytestmark = pytest.mark.slow  # deselected by `make test-fast`


@pytest.fixture(scope="module")
def corpus(checker):
    images = {f"imgs/{i:03d}.png": png(900 + i) for i in range(12)}
    adjustment = mixed_adjustment(checker, list(images.values()))
    verdicts = checker_at(adjustment).check(list(images.values()))
    expected = {key: v.nsfw for key, v in zip(images, verdicts, strict=True)}
    assert 0 < sum(expected.values()) < len(images)  # some objects are quarantined, some stay
    return images, adjustment, expected


@pytest.mark.usefixtures("ray_cluster")
def test_sigkill_at_each_storage_stage_then_rerun(s3, s3_endpoint, corpus):
    """One SIGKILL aimed at a random request of each stage of an applying run (journaling, copying, deleting, the row
    update, the manifest), one while a fresh scan commits parts; each rerun completes with nothing lost or doubled.
    (`python -m tests.reliability` runs the stratified random version, with more trials.)"""
    stages = ("/_quarantine/", "held/", "DELETE imgs/", "/_delta_log/", "_diffguard_scan.json")
    result = sigkill_trials(s3, s3_endpoint, *corpus, scoring_trials=1, aim=stages)
    print({k: v for k, v in result.items() if k not in ("records", "calibration")})
    for r in result["records"]:
        print(r["trial"], r["phase"], [(k["at_request"], k["killed_on"], k["left"]) for k in r["kills"]])
    assert result["mutating_requests_per_run"] >= 20
    for r in result["records"]:
        kill = r["kills"][0]
        assert kill["rc"] == -9 and kill["killed_on"], kill  # really killed, mid-run
        assert r["rerun_rc"] == 0, r
        assert r["violations"] == {}, r  # one row per object, every object exactly once, all scored
    hit = " ".join(r["kills"][0]["killed_on"] for r in result["records"])
    reached = [where for where in ("/parts/", *stages) if where in hit]
    assert len(reached) >= 5 and "/parts/" in hit and "/_quarantine/" in hit, (reached, hit)


@pytest.mark.usefixtures("ray_cluster")
def test_transient_s3_faults(s3, s3_endpoint, corpus):
    kinds = ("500", "503-slowdown", "drop", "drop-after", "truncate")
    result = faulty_s3_scan(s3, s3_endpoint, *corpus, rate=0.15, kinds=kinds, seed=3)
    print({k: v for k, v in result.items() if k != "audit"})
    hit = [k for k in kinds if result["counts"].get(k, 0) > 0]  # drawn at random per faulted request; the two
    assert result["injected"] >= 3 and len(hit) >= 2, result["counts"]  # botocore cannot retry are forced below
    assert result["rc"] == 0 and result["summary"]["errors"] == 0, result  # the job completed, every object scored
    assert result["violations"] == {}, result


def test_store_survives_lost_answers_and_cut_bodies(s3, s3_endpoint):
    """The two storage faults found by the runs above, injected deterministically: a conditional DELETE whose answer
    is lost (botocore's retry then finds no key) and GET bodies cut off mid-stream (botocore does not retry those)."""
    from pipeline.storage import S3Store
    from tests.faultproxy import FaultProxy
    from tests.reliability.scan_faults import new_bucket

    bucket = new_bucket(s3)
    s3.put_object(Bucket=bucket, Key="a.png", Body=png(1))
    s3.put_object(Bucket=bucket, Key="b.png", Body=png(2))
    seen: list[str] = []

    def hook(method: str, path: str) -> str | None:
        seen.append(method)
        if method == "DELETE" and seen.count("DELETE") == 1:
            return "drop-after"  # the delete lands, its answer does not
        if method == "GET" and seen.count("GET") <= 2:
            return "truncate"  # the first two GETs deliver half a body
        return None

    with FaultProxy(s3_endpoint, rate=0.0, hook=hook) as proxy:
        store = S3Store(bucket, proxy.url)
        data, info = store.read("b.png")
        assert data == png(2) and proxy.counts["truncate"] == 2
        store.delete("a.png", etag=store.head("a.png").etag)
    assert proxy.counts["drop-after"] == 1 and seen.count("DELETE") == 2  # retried, and the retry found it gone
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="a.png")
