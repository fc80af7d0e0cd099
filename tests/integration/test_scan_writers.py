"""Scored rows are committed by the workers, never by the driver: parts appear under DEST while the run goes, written
by other processes, the driver sees one small row of counts per part, and a worker whose part cannot be written fails
the run without losing or duplicating a row (the rerun completes it)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.scan_support import (
    all_keys,
    body,
    new_bucket,
    png,
    put_many,
    rows_by_key,
    scan,
    summary,
)

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

N = 24


def gated_write(gate: Path, marks: Path):  # noqa: ANN201
    """The write stage, wrapped (shipped to the workers by value): each call records its pid and part, then waits for
    ``gate`` so the test can look at DEST while the run is held mid-way."""
    from pipeline.scan import job

    write_part = job.write_part

    def write(batch, parts):  # noqa: ANN001, ANN202
        counts = write_part(batch, parts)
        part = counts["part"][0].as_py()
        mark = {"pid": os.getpid(), "part": part, "rows": counts["rows"][0].as_py()}
        (marks / f"{Path(part).stem}.json").write_text(json.dumps(mark))
        while not gate.exists():
            time.sleep(0.05)
        return counts

    return write


@pytest.mark.usefixtures("ray_cluster")
def test_workers_commit_the_parts_and_the_driver_sees_only_counts(tmp_path, capsys, monkeypatch):
    import ray

    from pipeline.scan import job, state

    @ray.remote
    def where() -> str:
        import pipeline

        return pipeline.__file__

    repo = str(Path(__file__).resolve().parents[2])
    assert ray.get(where.remote()).startswith(repo)  # the workers run this checkout's code

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    for i in range(N):
        (src / f"{i:02d}.png").write_bytes(png(300 + i))
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(job, "write_part", gated_write(gate, marks))

    driver_rows: list[list[str]] = []  # the columns of every batch the driver receives from the scoring dataset
    iter_batches = ray.data.Dataset.iter_batches

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN202
        for batch in iter_batches(self, *args, **kwargs):
            driver_rows.append(batch.column_names)
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", counted)
    driver_parts: list[int] = []
    commit = state.PartWriter.commit
    monkeypatch.setattr(state.PartWriter, "commit", lambda w, t: driver_parts.append(t.num_rows) or commit(w, t))

    outcome: dict = {}
    args = (str(src), "--output", str(dest), "--batch-size", "4", "--part-rows", "8")
    scanning = threading.Thread(target=lambda: outcome.update(zip(("rc", "out"), scan(capsys, *args), strict=True)))
    scanning.start()
    try:
        deadline = time.monotonic() + 300
        while not list(marks.iterdir()):  # the first part is committed; its writer now waits for the gate
            assert scanning.is_alive() and time.monotonic() < deadline, "no part was committed"
            time.sleep(0.1)
        staged = sorted(p.relative_to(dest).as_posix() for p in (dest / "parts").rglob("*.parquet"))
        assert staged and scanning.is_alive()  # parts are there while the run goes, before it completes
        assert not (dest / state.MANIFEST).exists()
        assert all("/part-000000-w" in rel for rel in staged), staged  # named by the workers
    finally:
        gate.touch()
        scanning.join(timeout=300)
    assert not scanning.is_alive()
    out = outcome["out"]
    assert outcome["rc"] == 0 and out == summary(N + 1, 0, 1, out["flagged"], 1, str(dest)) and out["flagged"] >= 1
    written = [json.loads(p.read_text()) for p in marks.iterdir()]
    assert os.getpid() not in {w["pid"] for w in written}  # committed by other processes
    assert sum(w["rows"] for w in written) == N + 2 and max(w["rows"] for w in written) <= 8  # --part-rows 8
    assert driver_parts == []  # no action: the driver committed nothing itself
    assert driver_rows and all(names == job.COUNTS.names for names in driver_rows)  # counts, never result rows
    rows = rows_by_key(str(dest))
    assert set(rows) == {f"{i:02d}.png" for i in range(N)} | {"broken.png"}


@pytest.mark.usefixtures("ray_cluster")
def test_a_part_that_cannot_be_written_fails_the_run_and_the_rerun_completes_it(s3, s3_endpoint, capsys, caplog):
    from tests.faultproxy import FaultProxy

    bucket = new_bucket(s3)
    images = {f"imgs/{i:02d}.png": png(500 + i) for i in range(N)}
    put_many(s3, bucket, images)
    dest = f"s3://{bucket}/results"
    puts: list[str] = []

    def hook(method: str, path: str) -> str | None:
        if method == "PUT" and "/parts/" in path:
            puts.append(path)
            return "500" if len(puts) > 2 else None  # two parts land, then every part write fails (after retries)
        return None

    with FaultProxy(s3_endpoint, rate=0.0, hook=hook) as proxy:
        args = (f"s3://{bucket}/imgs", "--output", dest, "--endpoint-url", proxy.url)
        rc, out = scan(capsys, *args, "--batch-size", "4", "--part-rows", "4")
    assert rc == 1 and out is None and proxy.counts["500"] >= 8  # botocore retried, then the job failed
    assert "/parts/run-000001/part-000000-w" in caplog.text  # the error names the part that could not be written
    parts = [k for k in all_keys(s3, bucket, "results/parts/") if k.endswith(".parquet")]
    assert len(parts) == 2 and "results/_diffguard_scan.json" not in all_keys(s3, bucket)
    committed = [pq.read_table(io.BytesIO(body(s3, bucket, k)))["key"].to_pylist() for k in parts]
    done = set(rows_by_key(dest, s3_endpoint))
    assert done == {key for keys in committed for key in keys} and 2 <= len(done) <= 8  # the two parts, nothing else

    rc, out = scan(capsys, f"s3://{bucket}/imgs", "--output", dest, "--endpoint-url", s3_endpoint)
    assert rc == 0 and out == summary(N - len(done), len(done), 0, out["flagged"], 0, dest)  # not scored twice
    assert set(rows_by_key(dest, s3_endpoint)) == set(images)  # one row per object, none lost
