"""The scan's results under DEST without Ray: the Delta table of completed runs plus staged parts, the crash points of a
compaction and of the one-time conversion of a format-1 DEST (``tests/fixtures/scan_format1``, written by the
format-1 code of commit 9c0e998: a snapshot of run 2 and one part of a killed run 3)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline.errors import StorageError
from pipeline.scan import commit, state
from pipeline.scan.commit import compact
from pipeline.scan.state import MANIFEST, ROW_SCHEMA, PartWriter, load_state, migrate, read_current, rows_table
from pipeline.scan.table import APP_ID
from pipeline.storage import parse_location

pytestmark = pytest.mark.unit
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "scan_format1"


class Crash(Exception):
    """Stands for kill -9 between two writes."""


def crash(*_args, **_kwargs):
    raise Crash


def rows(**etags: str) -> pa.Table:
    return rows_table([{"key": f"{k}.png", "etag": e} for k, e in etags.items()])


def view(dest) -> dict[str, str]:
    """key -> etag of the current view (every row, not-image ones included), asserting one row per key."""
    table = read_current(str(dest), non_images=True)
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)) and keys == sorted(keys)
    assert table.schema == ROW_SCHEMA
    return dict(zip(keys, table["etag"].to_pylist(), strict=True))


def versions(dest) -> list[int]:
    """The run each Delta version holds, oldest first."""
    latest = DeltaTable(str(dest / "results")).version()
    return [DeltaTable(str(dest / "results"), version=v).transaction_version(APP_ID) for v in range(latest + 1)]


def format1_view() -> dict[str, str]:
    """The fixture's current view computed from its files, independently of the code under test."""
    latest = {r["key"]: r["etag"] for r in pq.read_table(FIXTURE / "snapshots/run-000002.parquet").to_pylist()}
    latest |= {r["key"]: r["etag"] for r in pq.read_table(FIXTURE / "parts/run-000003/part-000000.parquet").to_pylist()}
    return dict(sorted(latest.items()))


@pytest.fixture(name="format1")
def format1_fixture(tmp_path) -> Path:
    dest = tmp_path / "dest"
    shutil.copytree(FIXTURE, dest)
    return dest


def completed(dest: Path) -> None:
    """Run 1 completed (a, b, c) and run 2 killed after one part (a changed, d new)."""
    location = parse_location(str(dest))
    PartWriter(location, 1).commit(rows(a="a1", b="b1", c="c1"))
    compact(location, 1, "src", ["a.png", "b.png", "c.png"], {"run": 1})
    PartWriter(location, 2).commit(rows(a="a2", d="d2"))


def test_a_completed_run_is_one_delta_version_with_one_row_per_object(tmp_path):
    dest = tmp_path / "dest"
    completed(dest)
    assert view(dest) == {"a.png": "a2", "b.png": "b1", "c.png": "c1", "d.png": "d2"}  # table + staged part
    location = parse_location(str(dest))
    compact(location, 2, "src", ["a.png", "c.png", "d.png"], {"run": 2})  # b.png deleted from the source
    after = {"a.png": "a2", "c.png": "c1", "d.png": "d2"}
    assert view(dest) == after and versions(dest) == [1, 2]
    assert {k: r["etag"] for k, r in DeltaTable(str(dest / "results")).to_pandas().set_index("key").iterrows()} == after
    old = DeltaTable(str(dest / "results"), version=0).to_pyarrow_table()
    assert dict(zip(old["key"].to_pylist(), old["etag"].to_pylist(), strict=True)) == {
        "a.png": "a1",
        "b.png": "b1",
        "c.png": "c1",
    }
    manifest = json.loads((dest / MANIFEST).read_text())
    assert (manifest["format"], manifest["table"], manifest["version"], manifest["snapshot_run"]) == (
        2,
        "results",
        1,
        2,
    )
    assert not (dest / "parts").exists() or not any((dest / "parts").rglob("*.parquet"))  # folded in, deleted
    assert load_state(location).last_run == 2


@pytest.mark.parametrize("step", ["commit_files", "_write_manifest", "_delete_folded"])
def test_a_crash_at_each_step_of_a_compaction_neither_drops_nor_duplicates(tmp_path, monkeypatch, step):
    dest = tmp_path / "dest"
    completed(dest)
    location = parse_location(str(dest))
    before = view(dest)
    real = getattr(commit, step)
    monkeypatch.setattr(commit, step, crash)  # killed before the Delta log entry is created, or after it landed
    with pytest.raises(Crash):
        compact(location, 2, "src", ["a.png", "c.png", "d.png"], {"run": 2})
    monkeypatch.setattr(commit, step, real)
    if step == "commit_files":
        assert view(dest) == before and versions(dest) == [1]  # the previous version and the staged part
    else:
        assert view(dest) == {"a.png": "a2", "c.png": "c1", "d.png": "d2"} and versions(dest) == [1, 2]
    nxt = load_state(location).last_run + 1  # the rerun
    assert nxt == 3
    PartWriter(location, nxt).commit(rows(e="e3"))
    compact(location, nxt, "src", ["a.png", "c.png", "d.png", "e.png"], {"run": nxt})
    assert view(dest) == {"a.png": "a2", "c.png": "c1", "d.png": "d2", "e.png": "e3"}
    assert versions(dest)[-1] == 3 and json.loads((dest / MANIFEST).read_text())["snapshot_run"] == 3


def test_a_commit_whose_answer_is_lost_counts_once(tmp_path, monkeypatch):
    """The log entry landed but the writer saw an error (S3 refuses the retried create with 412): the log decides."""
    import deltalake
    from deltalake.exceptions import CommitFailedError

    dest = tmp_path / "dest"
    completed(dest)
    real = deltalake.DeltaTable.create_write_transaction

    def landed_then_failed(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise CommitFailedError("Failed to commit transaction: version already exists")

    monkeypatch.setattr(deltalake.DeltaTable, "create_write_transaction", landed_then_failed)
    compact(parse_location(str(dest)), 2, "src", ["a.png", "d.png"], {"run": 2})
    assert versions(dest) == [1, 2] and view(dest) == {"a.png": "a2", "d.png": "d2"}


def test_a_commit_that_did_not_land_fails_closed(tmp_path, monkeypatch):
    import deltalake
    from deltalake.exceptions import CommitFailedError

    dest = tmp_path / "dest"
    completed(dest)

    def refused(*args, **kwargs):
        raise CommitFailedError("Failed to commit transaction: 0")

    monkeypatch.setattr(deltalake.DeltaTable, "create_write_transaction", refused)
    with pytest.raises(StorageError, match=r"cannot commit run 2 to the Delta table .*results"):
        compact(parse_location(str(dest)), 2, "src", ["a.png"], {"run": 2})
    assert versions(dest) == [1] and view(dest) == {"a.png": "a2", "b.png": "b1", "c.png": "c1", "d.png": "d2"}


def test_a_format1_dest_is_read_as_it_was(format1):
    assert view(format1) == format1_view()
    assert load_state(parse_location(str(format1))).last_run == 3  # the killed run's parts count
    assert set(read_current(str(format1))["key"].to_pylist()) == set(format1_view()) - {"notes.txt"}


def test_migration_keeps_every_row_and_says_so(format1, caplog):
    old = read_current(str(format1), non_images=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.scan.state"):
        assert migrate(parse_location(str(format1)))
    warning = caplog.records[0].getMessage()
    assert str(format1) in warning and "snapshots/run-000002.parquet" in warning and str(format1 / "results") in warning
    assert read_current(str(format1), non_images=True).equals(old)  # every column of every row, the part included
    manifest = json.loads((format1 / MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["version"] == 0 and manifest["snapshot_run"] == 2
    assert manifest["migrated_from"] == "snapshots/run-000002.parquet" and "snapshot" not in manifest
    assert not (format1 / "snapshots/run-000002.parquet").exists()
    assert (format1 / "parts/run-000003/part-000000.parquet").exists()  # the killed run's rows stay staged
    snapshot = pq.read_table(FIXTURE / "snapshots/run-000002.parquet")
    assert state.conform(DeltaTable(str(format1 / "results")).to_pyarrow_table()).equals(state.conform(snapshot))
    assert versions(format1) == [2]
    assert not migrate(parse_location(str(format1)))  # once


@pytest.mark.parametrize("step", ["commit", "_write_manifest", "_delete_folded"])
def test_a_crash_at_each_step_of_the_migration_leaves_a_readable_dest(format1, monkeypatch, step):
    location = parse_location(str(format1))
    monkeypatch.setattr(state, step, crash)
    with pytest.raises(Crash):
        migrate(location)
    monkeypatch.undo()
    assert view(format1) == format1_view()
    assert load_state(location).last_run == 3
    assert migrate(location)  # the next scan finishes it
    assert view(format1) == format1_view() and versions(format1) == [2]  # committed once, even when it had been
    assert json.loads((format1 / MANIFEST).read_text())["format"] == 2
    assert not (format1 / "snapshots").exists() or not any((format1 / "snapshots").iterdir())
    compact(location, 4, "/fixture/src", ["a.png", "c.png", "d.png"], {"run": 4})  # the rerun completes
    assert view(format1) == {k: v for k, v in format1_view().items() if k != "notes.txt"}  # b.png: quarantined
    assert versions(format1) == [2, 4]


def test_unknown_formats_and_foreign_tables_are_refused(tmp_path):
    from pipeline.errors import InvalidInput

    dest = tmp_path / "dest"
    completed(dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    (dest / MANIFEST).write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(InvalidInput, match=r"format 3; this version reads formats 1 and 2"):
        read_current(str(dest))
    other = tmp_path / "other"
    from deltalake import write_deltalake

    write_deltalake(str(other / "results"), rows(a="a1"))  # a Delta table no scan wrote
    with pytest.raises(StorageError, match=r"without a diffguard run"):
        read_current(str(other))


def test_worker_parts_sort_between_the_drivers_parts_of_their_run(tmp_path):
    """Workers' parts (named without coordination) hold the rows scored between the driver's parts: journal
    recovery before scoring, actions after it. The latest row per key must follow that order, not the names'."""
    dest = tmp_path / "dest"
    location = parse_location(str(dest))
    driver = PartWriter(location, 1)
    driver.commit(rows(a="a-recovered", q="q-recovered"))  # part-000000: before scoring
    workers = driver.workers()
    first = workers.commit(rows(a="a-scored", b="b-scored"))
    second = workers.commit(rows(c="c-scored"))
    driver.commit(rows(b="b-quarantined"))  # part-000001: an action on a scored row
    assert first.startswith("parts/run-000001/part-000001-w") and first.endswith(".parquet") and first != second
    assert workers.commit(rows(b="b-scored", a="a-scored")) == first  # the same rows again (a retry): same file
    later = PartWriter(location, 2).workers()  # a rerun's worker parts (slot 0) come after every part of run 1
    later.commit(rows(q="q-rescored"))
    expected = {"a.png": "a-scored", "b.png": "b-quarantined", "c.png": "c-scored", "q.png": "q-rescored"}
    assert view(dest) == expected
    assert load_state(location).last_run == 2
    compact(location, 2, "src", list(expected), {"run": 2})
    assert view(dest) == expected and not any((dest / "parts").rglob("*.parquet"))  # worker parts folded in too


def test_a_table_written_before_new_columns_gains_them_with_the_next_run(tmp_path):
    """A DEST whose Delta table predates columns (here detector_scores, demo, real): the next run's commit adds them to
    the table's schema first, so its rows keep their values (a data commit alone would not change the schema and
    readers would drop them), and the older rows read them as null."""
    from pipeline.scan.shards import write_shard
    from pipeline.scan.table import commit_files

    dest = parse_location(str(tmp_path / "dest"))
    new_columns = ["detector_scores", "demo", "real"]
    old = rows(a="a1", b="b1").drop_columns(new_columns)  # what an older diffguard wrote
    first = write_shard(dest, 0, 1, 1, old)
    commit_files(dest, [first], [], 1, old.schema, overwrite=False)
    assert "detector_scores" not in DeltaTable(str(tmp_path / "dest" / "results")).schema().to_arrow().names

    scored = {"detector_scores": {"open_nsfw": {"nsfw": 0.93}}, "demo": ["stock checker"], "real": ["open_nsfw"]}
    new = rows_table([{"key": "a.png", "etag": "a1"}, {"key": "b.png", "etag": "b2", **scored}])
    commit_files(dest, [write_shard(dest, 0, 1, 2, new)], [first["path"]], 2, ROW_SCHEMA, overwrite=False)
    table = DeltaTable(str(tmp_path / "dest" / "results"))
    assert set(new_columns) <= set(table.schema().to_arrow().names) and table.transaction_version(APP_ID) == 2
    current = {r["key"]: r for r in read_current(str(tmp_path / "dest")).to_pylist()}
    assert dict(dict(current["b.png"]["detector_scores"])["open_nsfw"]) == {"nsfw": 0.93}
    assert (current["b.png"]["demo"], current["b.png"]["real"]) == (["stock checker"], ["open_nsfw"])
    assert (current["a.png"]["detector_scores"], current["a.png"]["real"]) == (None, None)
