"""The whole review loop against moto and a real browser: scan a bucket -> review it in Chromium (overturn one object
and confirm another with the keyboard) -> ``scan --apply --quarantine`` leaves the overturned object in place and moves
the confirmed one -> a later overturn and ``scan --release --apply`` bring it back (and keep it back) -> ``--tag`` and
``--release`` remove only the tag the scan set -> ``evaluate`` and ``calibrate --labels DEST`` learn from the
decisions; ``diffguard decisions`` exports them."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import yaml

from pipeline.cli import main
from tests.integration.review_support import ReviewServer
from tests.integration.scan_support import (
    all_keys,
    body,
    checker_at,
    mixed_adjustment,
    new_bucket,
    png,
    put_many,
    rows_by_key,
    scan,
)
from tests.integration.test_review_page import open_page, wait_count, wait_thumbs

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: deselected by `make test-fast`


def decide(app: ReviewServer, key: str, decision: str) -> None:
    r = app.client.post(f"{app.url}/api/items/{quote(key, safe='')}/decision", json={"decision": decision})
    assert r.status_code == 200, r.text


@pytest.mark.usefixtures("ray_cluster")
def test_review_loop_quarantine_release_and_calibrate(s3, s3_endpoint, capsys, browser, tmp_path):
    bucket = new_bucket(s3)
    images = {f"up/{i:02d}.png": png(700 + i, (24, 32)) for i in range(12)}
    put_many(s3, bucket, images)
    adjustment = mixed_adjustment(checker_at(0.0), list(images.values()))
    dest, held = f"s3://{bucket}/_scan", f"s3://{bucket}/held/"
    args = (f"s3://{bucket}/up", "--output", dest, "--endpoint-url", s3_endpoint, "--adjustment", str(adjustment))
    rc, out = scan(capsys, *args)
    assert rc == 0 and out["flagged"] >= 3, out
    flagged = sorted(k for k, r in rows_by_key(dest, s3_endpoint).items() if r["flagged"])

    with ReviewServer(dest, "--endpoint-url", s3_endpoint, "--reviewer", "ana") as app:
        queue = app.client.get(app.url + "/api/items", params={"action": "block", "limit": 200}).json()["items"]
        assert sorted(i["key"] for i in queue) == flagged
        context, page = open_page(browser, app.page_url)
        try:
            page.select_option("#f-action", "block")
            wait_count(page, "#queue li.item", len(flagged))
            page.wait_for_selector("#queue li.item.current")
            wait_thumbs(page, len(flagged))
            page.keyboard.press("j")
            page.keyboard.press("k")
            page.keyboard.press("o")  # the first: a false positive
            page.wait_for_selector("#queue li.item[data-index='0'] .state.overturn")
            page.keyboard.press("c")  # the second: the machine was right
            page.wait_for_selector("#queue li.item[data-index='1'] .state.confirm")
            assert page.is_visible("#demo-warning")  # the scan ran the tiny checker: its manifest says so
            assert page.console_errors == []
        finally:
            context.close()
    overturned, confirmed = queue[0]["key"], queue[1]["key"]

    rc, out = scan(capsys, *args, "--quarantine", held, "--apply")
    assert rc == 0
    left = all_keys(s3, bucket, "up/")
    assert overturned in left and confirmed not in left  # the overturn is honoured, the confirmed object moved
    assert all(k not in left for k in flagged if k != overturned)  # every other flagged object moved as before
    assert body(s3, bucket, "held/" + confirmed) == images[confirmed]
    rows = rows_by_key(dest, s3_endpoint)
    assert (
        rows[overturned]["quarantined_to"] is None
        and rows[confirmed]["quarantined_to"] == f"s3://{bucket}/held/{confirmed}"
    )

    # a later look: the confirmed object was harmless after all; --release brings it back
    with ReviewServer(dest, "--endpoint-url", s3_endpoint) as app:
        thumb = app.client.get(f"{app.url}/api/items/{quote(confirmed, safe='')}/thumbnail")
        assert thumb.status_code == 200  # from held/
        decide(app, confirmed, "overturn")
    rc, out = scan(capsys, *args, "--release")  # a dry run moves nothing
    assert rc == 0 and out["released"] == 0 and confirmed not in all_keys(s3, bucket, "up/")
    rc, out = scan(capsys, *args, "--release", "--quarantine", held, "--apply")
    assert rc == 0 and out["released"] == 1
    assert body(s3, bucket, confirmed) == images[confirmed] and "held/" + confirmed not in all_keys(s3, bucket, "held/")
    assert rows_by_key(dest, s3_endpoint)[confirmed]["quarantined_to"] is None
    rc, out = scan(capsys, *args, "--quarantine", held, "--apply")  # and it stays released
    assert rc == 0 and confirmed in all_keys(s3, bucket, "up/") and overturned in all_keys(s3, bucket, "up/")
    assert not any(a.startswith("_scan/_release/") for a in all_keys(s3, bucket, "_scan/"))  # journal emptied

    # decisions exported, then used as labels: the two overturns are safe, a third object confirmed as its category
    with ReviewServer(dest, "--endpoint-url", s3_endpoint) as app:
        third = next(i["key"] for i in queue[2:] if i["flagged_categories"])
        decide(app, third, "confirm")
        category = app.client.get(f"{app.url}/api/items/{quote(third, safe='')}").json()["decision"]["category"]
    capsys.readouterr()
    assert main(["decisions", dest, "--endpoint-url", s3_endpoint, "--json"]) == 0
    exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    latest = {d["key"]: d for d in exported}
    assert {k: d["label"] for k, d in latest.items()} == {overturned: "safe", confirmed: "safe", third: category}
    assert all(not d["stale"] for d in exported)

    common = [
        "--labels",
        dest,
        "--endpoint-url",
        s3_endpoint,
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    common += ["--adjustment", str(adjustment)]
    assert main(["evaluate", *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == {"safe": 2, category: 1}
    out_policy = tmp_path / "calibrated.yaml"
    assert main(["calibrate", *common, "--out", str(out_policy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == {"safe": 2, category: 1}
    assert yaml.safe_load(out_policy.read_text())["calibrated"] is True


@pytest.mark.usefixtures("ray_cluster")
def test_tag_then_release_removes_only_the_scan_tag(s3, s3_endpoint, capsys):
    bucket = new_bucket(s3)
    images = {f"t/{i}.png": png(900 + i, (24, 32)) for i in range(8)}
    put_many(s3, bucket, images)
    adjustment = mixed_adjustment(checker_at(0.0), list(images.values()))
    dest = f"s3://{bucket}/_scan"
    args = (f"s3://{bucket}/t", "--output", dest, "--endpoint-url", s3_endpoint, "--adjustment", str(adjustment))
    assert scan(capsys, *args)[0] == 0
    flagged = sorted(k for k, r in rows_by_key(dest, s3_endpoint).items() if r["flagged"])
    key = flagged[0]
    s3.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": [{"Key": "owner", "Value": "ana"}]})
    assert scan(capsys, *args, "--tag", "--apply")[0] == 0
    tags = lambda: {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}  # noqa: E731
    assert tags() == {"owner": "ana", "moderation": "nsfw"}
    with ReviewServer(dest, "--endpoint-url", s3_endpoint) as app:
        decide(app, key, "overturn")
    rc, out = scan(capsys, *args, "--release", "--apply")
    assert rc == 0 and out["released"] == 1
    assert tags() == {"owner": "ana"}  # only the tag the scan set
    rows = rows_by_key(dest, s3_endpoint)
    assert rows[key]["tagged"] is False and all(rows[k]["tagged"] for k in flagged[1:])
    assert scan(capsys, *args, "--tag", "--apply")[0] == 0  # the overturn holds: never tagged again
    assert tags() == {"owner": "ana"}


@pytest.mark.usefixtures("ray_cluster")
def test_local_release_keeps_the_overturn_bound_to_the_restored_bytes(capsys, tmp_path):
    from pipeline.decisions import DecisionLog

    src, dest, held = tmp_path / "src", tmp_path / "dest", tmp_path / "held"
    images = {f"d/{i}.png": png(950 + i, (24, 32)) for i in range(8)}
    for key, data in images.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    adjustment = mixed_adjustment(checker_at(0.0), list(images.values()))
    args = (str(src), "--output", str(dest), "--adjustment", str(adjustment))
    assert scan(capsys, *args, "--quarantine", str(held), "--apply")[0] == 0
    flagged = sorted(k for k, r in rows_by_key(str(dest)).items() if r["flagged"])
    key = flagged[0]
    assert not (src / key).exists() and (held / key).read_bytes() == images[key]
    old_etag = rows_by_key(str(dest))[key]["etag"]
    with ReviewServer(dest) as app:
        decide(app, key, "overturn")
    rc, out = scan(capsys, *args, "--release", "--apply")  # without the quarantine's location: refused, kept
    assert rc == 0 and out["released"] == 0 and (held / key).exists() and not (src / key).exists()
    rc, out = scan(capsys, *args, "--release", "--quarantine", str(held), "--apply")
    assert rc == 0 and out["released"] == 1
    assert (src / key).read_bytes() == images[key] and not (held / key).exists()
    row = rows_by_key(str(dest))[key]
    assert row["etag"] != old_etag and row["quarantined_to"] is None  # a new file: a new etag, the same bytes
    log = DecisionLog.open(str(dest))
    assert len(log.all()) == 1 and log.get(key, row["sha256"]).decision == "overturn"  # bound to the bytes: no copy
    rc, out = scan(capsys, *args, "--quarantine", str(held), "--apply")  # unchanged, not rescored, not moved again
    assert rc == 0 and out["scanned"] == 0 and (src / key).exists() and not (held / key).exists()
    capsys.readouterr()
    assert main(["decisions", str(dest)]) == 0
    assert "overturn" in (listed := capsys.readouterr().out) and "(stale)" not in listed  # in force for these bytes
