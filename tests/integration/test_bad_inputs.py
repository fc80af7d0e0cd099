"""The bad-input corpus (``tests/corpus.py``) against every entry point: the core ``check``, ``diffguard check``,
``diffguard scan``, ``/v1/moderate`` and ``/v1/generate``. Each input gets its documented status or error row, no
error response carries image bytes, and the service is still healthy (same replicas, still serving) afterwards."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.corpus import generate_cases, image_cases, moderate_cases
from tests.integration.conftest import free_port
from tests.integration.scan_support import rows_by_key, scan, summary
from tests.reliability.apps import TINY, app, apply, replicas, serve_config
from tests.reliability.load import Call, LoadStats, audit, verify_samples

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

MAX_BODY = 2_000_000
APP = "bad"
CASES = image_cases()
ERRORS = sum(c.error is not None for c in CASES)


def assert_row(case, error: str | None, scores: list) -> None:
    if case.error is None:
        assert error is None and len(scores) == 17, (case.name, error)
    else:
        assert error is not None and re.search(case.error, error), (case.name, error)
        assert len(scores) == 0, case.name


def test_corpus_is_broad():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    assert 10 <= ERRORS <= len(CASES) - 10  # both outcomes well represented
    assert len(moderate_cases(MAX_BODY)) + len(generate_cases(MAX_BODY)) >= 30


def test_core_check_one_batch(checker):
    verdicts = checker.check([c.data for c in CASES])  # one batch: a bad item never fails its neighbours
    for case, verdict in zip(CASES, verdicts, strict=True):
        assert_row(case, verdict.error, verdict.concept_scores)


def test_cli_check(tmp_path, capsys):
    from pipeline.cli import main

    for case in CASES:
        (tmp_path / case.filename).write_bytes(case.data)
    capsys.readouterr()
    rc = main(["check", "--json", "--device", "cpu", "--dtype", "float32", str(tmp_path)])
    rows = {json.loads(line)["path"]: json.loads(line) for line in capsys.readouterr().out.splitlines()}
    assert rc == 3  # some inputs could not be read; their rows are still printed
    assert len(rows) == len(CASES)
    for case in CASES:
        row = rows[str(tmp_path / case.filename)]
        assert_row(case, row["error"], row["concept_scores"])


@pytest.mark.usefixtures("ray_cluster")
def test_scan_directory(tmp_path, capsys):
    src, dest = tmp_path / "corpus", tmp_path / "results"
    src.mkdir()
    for case in CASES:
        (src / case.filename).write_bytes(case.data)
    rc, out = scan(capsys, str(src), "--output", str(dest), "--batch-size", "8")
    assert rc == 0 and out == summary(len(CASES), 0, 0, out["flagged"], ERRORS, str(dest))
    rows = rows_by_key(str(dest))  # exactly one row per object
    assert set(rows) == {c.filename for c in CASES}
    for case in CASES:
        row = rows[case.filename]
        assert_row(case, row["error"], row["concept_scores"])
        assert row["error_kind"] == (None if case.error is None else "decode")
        assert row["sha256"] is not None and row["size"] == len(case.data)


@pytest.fixture(scope="module")
def service(ray_cluster):
    from ray import serve

    port = free_port()
    generator = {"model": "tiny", "device": "cpu", "dtype": "float32"}
    apply(serve_config(port, [app(APP, checker=TINY, generator=generator, ingress={"max_body_bytes": MAX_BODY})]))
    base = f"http://127.0.0.1:{port}/{APP}"
    before = {d: {r["replica_id"] for r in replicas(APP, d)} for d in ("Ingress", "SafetyChecker", "Generator")}
    yield base, before
    serve.shutdown()


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service[0], timeout=300) as c:
        yield c


def test_moderate_multipart_corpus(client):
    files = [("files", (c.filename, c.data, c.content_type)) for c in CASES]
    r = client.post("/v1/moderate", files=files)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [row["filename"] for row in rows] == [c.filename for c in CASES]
    for case, row in zip(CASES, rows, strict=True):
        assert_row(case, row["error"], row["concept_scores"])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_moderate_raw_body(client, case):
    r = client.post("/v1/moderate", content=case.data, headers={"Content-Type": case.content_type})
    body = r.json()
    if case.error is None:
        assert r.status_code == 200, r.text
        assert_row(case, body["results"][0]["error"], body["results"][0]["concept_scores"])
    else:
        assert r.status_code == 400 and re.search(case.error, body["error"]), r.text
        assert body["request_id"]


@pytest.mark.parametrize("case", moderate_cases(MAX_BODY), ids=lambda c: c.name)
def test_moderate_requests(client, case):
    r = client.post("/v1/moderate", **case.request())
    assert r.status_code == case.status, r.text[:500]
    if case.status != 200:
        assert re.search(case.message, r.json()["error"]), r.text[:500]
        assert r.json()["request_id"]
    else:
        assert all(row["error"] is None for row in r.json()["results"])


@pytest.mark.parametrize("case", generate_cases(MAX_BODY), ids=lambda c: c.name)
def test_generate_requests(client, case, checker):
    r = client.post("/v1/generate", **case.request())
    assert r.status_code == case.status, r.text[:500]
    if case.status != 200:
        assert re.search(case.message, r.json()["error"]), r.text[:500]
        assert "image_png_base64" not in r.text
        return
    stats = LoadStats()
    audit(stats, Call("generate", "/v1/generate", lambda i: {}, 1), r)
    assert stats.problems == [] and stats.unchecked_images_out == 0
    assert verify_samples(stats, checker) == stats.images_out  # released pixels carry their own verdict
    assert stats.unchecked_images_out == 0, stats.problems


def test_service_healthy_after_corpus(service, client, checker):
    """Last in this module: after every hostile input above, the same replicas still serve correctly."""
    base, before = service
    assert client.get("/healthz").json() == {"ready": True, "deployments": {"checker": "ready", "generator": "ready"}}
    r = client.post("/v1/generate", json={"prompt": "a red bicycle", "steps": 1, "seed": 9, "num_images": 2})
    assert r.status_code == 200
    stats = LoadStats()
    audit(stats, Call("generate", "/v1/generate", lambda i: {}, 2), r)
    verify_samples(stats, checker)
    assert stats.problems == []
    after = {d: {r["replica_id"] for r in replicas(APP, d)} for d in before}
    assert after == before  # no replica crashed or was replaced
