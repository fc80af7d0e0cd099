"""A scan's results as a Delta Lake table that engines read without diffguard: the exact duckdb and pandas snippets of
docs/SCANS.md run against scanned DESTs (a local directory and a moto bucket), time travel to an earlier run, a
format-1 DEST converted by the next scan, and an S3 commit whose answer is lost."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.scan_support import (
    new_bucket,
    png,
    put_many,
    rows_by_key,
    scan,
)

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

DOC = ROOT / "docs" / "SCANS.md"
DOC_DEST = "/tmp/examples-scan"  # the DEST the documented snippets name
FIXTURE = ROOT / "tests" / "fixtures" / "scan_format1"


def snippets() -> list[str]:
    """The python blocks of the section "Reading the results from duckdb and pandas", in order."""
    text = DOC.read_text()
    section = text[text.index("## Reading the results from duckdb and pandas") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3, f"expected the duckdb, pandas and S3 snippets in {DOC}, found {len(blocks)}"
    return blocks


def run_snippet(code: str, **replace: str) -> dict:
    for old, new in replace.items():
        assert old in code, f"{old!r} not in the documented snippet"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documented snippet, verbatim but for paths
    return namespace


def comparable(table) -> list[dict]:
    """Rows with ROW_SCHEMA's types, in key order (engines return their own string and map types)."""
    from pipeline.scan.state import ROW_SCHEMA, conform

    return conform(table).select(ROW_SCHEMA.names).sort_by("key").to_pylist()


def current(dest: str, endpoint: str | None = None, non_images: bool = False) -> list[dict]:
    from pipeline.scan import read_current

    return comparable(read_current(dest, endpoint, non_images=non_images))


def pandas_rows(df) -> list[dict]:
    """A DataFrame back as rows of ROW_SCHEMA (pandas holds maps as lists of pairs, nulls as None or NaN)."""
    import pyarrow as pa

    from pipeline.scan.state import ROW_SCHEMA

    return comparable(pa.Table.from_pandas(df[ROW_SCHEMA.names], schema=ROW_SCHEMA, preserve_index=False))


@pytest.mark.usefixtures("ray_cluster")
def test_the_documented_duckdb_and_pandas_reads_on_a_local_dest(tmp_path, capsys):
    src, dest = tmp_path / "src", str(tmp_path / "scan")
    src.mkdir()
    for i in range(6):
        (src / f"{i:02d}.png").write_bytes(png(300 + i))
    (src / "notes.txt").write_text("not an image")
    rc, out = scan(capsys, str(src), "--output", dest, "--adjustment", "0.02")
    assert rc == 0 and out["scanned"] == 6
    first = current(dest)
    assert len(first) == 6 and len(rows_by_key(dest)) == 6

    duck, pandas, _ = snippets()
    ns = run_snippet(duck, **{DOC_DEST: dest})
    assert comparable(ns["images"]) == first  # one row per image object, every column equal
    assert ns["flagged"] == [(r["key"], r["action"], r["flagged_categories"]) for r in first if r["flagged"]]
    ns = run_snippet(pandas, **{DOC_DEST: dest})
    assert pandas_rows(ns["df"]) == first
    assert pandas_rows(ns["first"][ns["first"]["error_kind"] != "not_image"]) == first  # version 0: this run

    (src / "00.png").write_bytes(png(999))  # changed
    (src / "01.png").unlink()  # deleted
    (src / "new.png").write_bytes(png(1000))  # added
    rc, out = scan(capsys, str(src), "--output", dest, "--adjustment", "0.02")
    assert rc == 0 and out["scanned"] == 2
    second = current(dest)
    assert {r["key"] for r in second} == {r["key"] for r in first} - {"01.png"} | {"new.png"}
    ns = run_snippet(duck, **{DOC_DEST: dest})
    assert comparable(ns["images"]) == second
    ns = run_snippet(pandas, **{DOC_DEST: dest})
    assert pandas_rows(ns["df"]) == second
    assert pandas_rows(ns["first"][ns["first"]["error_kind"] != "not_image"]) == first  # time travel
    assert len(ns["first"]) == 7  # the not-image row is in the table too
    assert json.loads((tmp_path / "scan" / "_diffguard_scan.json").read_text())["version"] == 1


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_the_documented_s3_read_on_a_moto_dest(s3, s3_endpoint, capsys):
    bucket = new_bucket(s3)
    put_many(s3, bucket, {f"imgs/{i:02d}.png": png(400 + i) for i in range(5)} | {"imgs/readme.txt": b"hello"})
    dest = f"s3://{bucket}/scans/uploads"
    rc, out = scan(capsys, f"s3://{bucket}/imgs", "--output", dest, "--endpoint-url", s3_endpoint)
    assert rc == 0 and out["scanned"] == 5
    *_, on_s3 = snippets()
    ns = run_snippet(
        on_s3,
        **{"http://minio.internal:9000": s3_endpoint, "s3://moderation/scans/uploads": dest},
    )
    assert pandas_rows(ns["df"]) == current(dest, s3_endpoint, non_images=True)  # the S3 snippet reads every row
    assert len(ns["df"]) == 6


@pytest.mark.usefixtures("ray_cluster")
def test_the_next_scan_converts_a_format1_dest_loudly_and_keeps_its_history(tmp_path, capsys, caplog):
    from deltalake import DeltaTable

    from pipeline.scan.state import conform
    from pipeline.scan.table import APP_ID

    src, dest = tmp_path / "src", tmp_path / "scan"
    shutil.copytree(FIXTURE, dest)
    manifest = json.loads((dest / "_diffguard_scan.json").read_text())
    (dest / "_diffguard_scan.json").write_text(json.dumps({**manifest, "source": str(src)}))
    src.mkdir()
    for name in ("a.png", "c.png", "d.png", "e.png"):  # the fixture's objects (b.png quarantined) and a new one
        (src / name).write_bytes(png(len(name) + ord(name[0])))
    (src / "notes.txt").write_text("not an image")
    before = current(str(dest), non_images=True)

    with caplog.at_level(logging.WARNING):
        rc, out = scan(capsys, str(src), "--output", str(dest))
    assert rc == 0 and out["scanned"] == 4  # local etags differ from the fixture's: rescored
    warning = next(r.getMessage() for r in caplog.records if "converting" in r.getMessage())
    assert str(dest) in warning and "run-000002.parquet" in warning and str(dest / "results") in warning
    table = str(dest / "results")
    v0 = DeltaTable(table, version=0)
    assert v0.transaction_version(APP_ID) == 2  # the format-1 snapshot, as run 2
    snapshot = {r["key"]: r["etag"] for r in before if r["key"] != "d.png"} | {"c.png": "c1"}  # without run 3's part
    assert {r["key"]: r["etag"] for r in comparable(v0.to_pyarrow_table())} == snapshot
    latest = DeltaTable(table)
    assert latest.version() == 1 and latest.transaction_version(APP_ID) == 4  # run 3 was the killed one
    rows = {r["key"]: r for r in current(str(dest), non_images=True)}
    assert set(rows) == {"a.png", "b.png", "c.png", "d.png", "e.png", "notes.txt"}
    assert rows["b.png"]["quarantined_to"] == "/fixture/held/b.png"  # a moved object keeps its row
    assert comparable(conform(latest.to_pyarrow_table())) == list(rows.values())
    manifest = json.loads((dest / "_diffguard_scan.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["snapshot_run"]) == (2, 1, 4)
    assert not list(dest.glob("snapshots/*.parquet")) and not list(dest.glob("parts/**/*.parquet"))


@pytest.mark.slow
def test_an_s3_commit_whose_answer_is_lost_counts_once(s3, s3_endpoint):
    """The PUT creating the log entry lands but its answer is lost: the retried create meets 412 and the log decides."""
    from pipeline.scan.commit import compact
    from pipeline.scan.state import PartWriter, read_current, rows_table
    from pipeline.storage import parse_location
    from tests.faultproxy import FaultProxy

    bucket = new_bucket(s3)
    dropped: list[str] = []

    def hook(method: str, path: str) -> str | None:
        if method == "PUT" and "/_delta_log/" in path and path.endswith(".json") and not dropped:
            dropped.append(path)
            return "drop-after"
        return None

    with FaultProxy(s3_endpoint, rate=0.0, hook=hook) as proxy:
        dest = parse_location(f"s3://{bucket}/results", proxy.url)
        PartWriter(dest, 1).commit(rows_table([{"key": k, "etag": "e1"} for k in ("a", "b")]))
        compact(dest, 1, "src", ["a", "b"], {"run": 1})
        PartWriter(dest, 2).commit(rows_table([{"key": "a", "etag": "e2"}]))
        compact(dest, 2, "src", ["a"], {"run": 2})
    assert proxy.counts["drop-after"] == 1 and dropped
    table = read_current(f"s3://{bucket}/results", s3_endpoint)
    assert table["key"].to_pylist() == ["a"] and table["etag"].to_pylist() == ["e2"]
    logs = sorted(k for k in _keys(s3, bucket, "results/results/_delta_log/") if k.endswith(".json"))
    assert [Path(k).name for k in logs] == ["00000000000000000000.json", "00000000000000000001.json"]


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    from tests.integration.scan_support import all_keys

    return sorted(all_keys(s3, bucket, prefix))
