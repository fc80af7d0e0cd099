"""Decisions, actions and releases name the exact bytes, and what DEST holds is trusted only within bounds.

The storage's pinned reads, the decisions journal read as untrusted (malformed files, future dates, decisions from
before they were bound to bytes), forged quarantine and release journal entries, and the release race (a write that
lands right after the restored object was verified). No Ray, no server: local stores in a temp directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.decisions import PREFIX, SCHEMA, Decision, DecisionLog, current_decisions, now
from pipeline.errors import ObjectChanged
from pipeline.scan.actions import recover
from pipeline.scan.release import JOURNAL as RELEASE_JOURNAL
from pipeline.scan.release import recover_releases, release
from pipeline.scan.state import PartWriter, load_state, rows_table
from pipeline.storage import LocalStore, Location, Version, parse_location, sha256

pytestmark = pytest.mark.unit
U, S = b"the unsafe bytes that were scanned", b"harmless bytes swapped in later"


def _decision(key: str, data: bytes | None, what: str = "overturn", when: datetime | None = None) -> Decision:
    digest = sha256(data) if data is not None else None
    return Decision(key, "e1", None, what, None, None, "ana", when or now(), sha256=digest)


def _write_decisions(dest: Path, name: str, rows: list[dict], schema: pa.Schema = SCHEMA) -> None:
    (dest / PREFIX).mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    (dest / PREFIX / name).write_bytes(buf.getvalue())


# --- storage ------------------------------------------------------------------------------------------------------
def test_a_local_read_pinned_to_another_version_raises_and_reads_nothing(tmp_path):
    store = LocalStore(str(tmp_path))
    (tmp_path / "a.png").write_bytes(U)
    scanned = store.head("a.png")
    assert store.read("a.png", scanned)[0] == U and store.read("a.png", Version(scanned.etag))[0] == U
    os.replace(_temp(tmp_path, S), tmp_path / "a.png")  # swapped: a new file under the same name
    with pytest.raises(ObjectChanged, match="changed since it was scanned"):
        store.read("a.png", scanned)
    assert store.read("a.png")[0] == S  # unpinned: whatever is there now


def _temp(folder: Path, data: bytes) -> Path:
    path = folder / "incoming.tmp"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("location", "url", "key"),
    [
        ("/q", "/q/a/b.png", "a/b.png"),
        ("/q", "/q/../etc/passwd", None),
        ("/q", "/qq/x.png", None),
        ("/q", "/q", None),
        ("/q", "relative/x.png", None),
        ("/q", "s3://q/x.png", None),
        ("s3://b/held", "s3://b/held/x.png", "held/x.png"),
        ("s3://b/held", "s3://b/other/x.png", None),
        ("s3://b/held", "s3://c/held/x.png", None),
        ("s3://b/held", "/b/held/x.png", None),
    ],
)
def test_a_location_holds_only_what_lies_inside_it(location, url, key):
    assert parse_location(location).holds(url) == key


# --- the decisions journal, read as untrusted -----------------------------------------------------------------------
def test_a_malformed_decisions_file_or_row_is_skipped_with_a_warning_never_fatal(tmp_path, caplog):
    dest = parse_location(str(tmp_path))
    DecisionLog(dest).append([_decision("good.png", U)])
    (tmp_path / PREFIX / "part-00000000000000000001-garbage.parquet").write_bytes(b"not parquet at all")
    good = _decision("x.png", U).__dict__
    _write_decisions(tmp_path, "part-00000000000000000002-bad.parquet", [{**good, "decision": "maybe"}])
    caplog.set_level(logging.WARNING)
    log = DecisionLog(dest)
    assert [d.key for d in log.all()] == ["good.png"]
    assert "garbage.parquet: not a readable decisions file" in caplog.text
    assert "row 0 of" in caplog.text and "bad.parquet" in caplog.text and "'maybe'" in caplog.text


def test_a_future_dated_decision_is_not_believed(tmp_path, caplog):
    dest = parse_location(str(tmp_path))
    DecisionLog(dest).append([_decision("a.png", U, "confirm")])
    future = _decision("a.png", U, "overturn", now() + timedelta(days=365)).__dict__
    _write_decisions(tmp_path, "part-99999999999999999999-future.parquet", [future])
    caplog.set_level(logging.WARNING)
    log = DecisionLog(dest)
    assert log.get("a.png", sha256(U)).decision == "confirm"  # the forged overturn does not win forever
    assert "in the future" in caplog.text and "future.parquet" in caplog.text


def test_a_decision_is_in_force_only_for_the_bytes_it_was_made_on(tmp_path):
    dest = parse_location(str(tmp_path))
    DecisionLog(dest).append([_decision("a.png", S)])  # a reviewer overturned the harmless bytes
    current = pa.table({"key": ["a.png"], "etag": ["e1"], "sha256": [sha256(U)]})  # same key, same etag, other bytes
    assert current_decisions(dest, current) == {}
    current = pa.table({"key": ["a.png"], "etag": ["e2"], "sha256": [sha256(S)]})  # those bytes, re-uploaded
    assert current_decisions(dest, current)["a.png"].decision == "overturn"


def test_decisions_written_before_the_binding_keep_confirms_but_not_overturns(tmp_path):
    legacy = pa.schema([f for f in SCHEMA if f.name != "sha256"])
    when = datetime(2026, 11, 1, tzinfo=UTC)
    rows = [
        {"key": k, "etag": "e1", "fingerprint": None, "decision": d, "category": c, "note": None, "reviewer": "ana"}
        | {"decided_at": when}
        for k, d, c in (("o.png", "overturn", None), ("c.png", "confirm", "sexual"))
    ]
    _write_decisions(tmp_path, "part-00000000000000000001-old.parquet", rows, legacy)
    current = pa.table({"key": ["o.png", "c.png"], "etag": ["e1", "e1"], "sha256": [sha256(U), sha256(U)]})
    found = current_decisions(parse_location(str(tmp_path)), current)
    assert {k: d.decision for k, d in found.items()} == {"c.png": "confirm"}  # an S3 ETag repeats: no exemption


# --- journals under DEST: acted on only within bounds ---------------------------------------------------------------
@dataclass
class Scene:
    src: Path
    held: Path
    dest: Path
    outside: Path

    def locations(self) -> tuple[Location, Location, Location]:
        return parse_location(str(self.src)), parse_location(str(self.held)), parse_location(str(self.dest))


@pytest.fixture
def scene(tmp_path) -> Scene:
    parts = Scene(*(tmp_path / n for n in ("src", "held", "dest", "outside")))
    for folder in parts.__dict__.values():
        folder.mkdir()
    return parts


def _row(src: Path, key: str, data: bytes, **extra) -> dict:
    etag = LocalStore(str(src)).head(key).etag if (src / key).exists() else "gone"
    now_ = datetime.now(UTC)
    return (
        {"bucket": str(src), "key": key, "etag": etag, "size": len(data), "sha256": sha256(data)}
        | {
            "last_modified": now_,
            "scanned_at": now_,
            "flagged": False,
            "action": "allow",
            "tagged": False,
        }
        | extra
    )


def _journal(dest: Path, folder: str, entry: dict) -> Path:
    path = dest / folder / (hashlib.sha1(entry["key"].encode()).hexdigest() + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))
    return path


def test_a_forged_release_entry_never_deletes_a_file_outside_the_quarantine(scene, caplog):
    victim = scene.outside / "victim.bin"
    victim.write_bytes(U)
    (scene.src / "a.png").write_bytes(U)  # the "restored" object the entry claims
    current = rows_table([_row(scene.src, "a.png", U)])
    entry = _journal(scene.dest, RELEASE_JOURNAL, {"key": "a.png", "from": str(victim), "size": 1, "sha256": sha256(U)})
    source, held, dest = scene.locations()
    caplog.set_level(logging.WARNING)
    assert recover_releases(dest, source, current, PartWriter(dest, 2), True, held) == (0, 1)
    assert victim.read_bytes() == U and entry.exists()  # refused, reported, kept: nothing deleted
    assert "refused the release journal entry" in caplog.text and "is not inside the quarantine" in caplog.text


def test_a_forged_quarantine_entry_never_deletes_an_unflagged_source_object(scene, caplog):
    (scene.src / "b.png").write_bytes(U)
    (scene.outside / "b.png").write_bytes(U)  # a "verified copy" where no quarantine is
    current = rows_table([_row(scene.src, "b.png", U)])
    etag = current["etag"][0].as_py()
    dst = {"kind": "local", "root": str(scene.outside), "key": "b.png"}
    forged = {"key": "b.png", "etag": etag, "size": len(U), "sha256": sha256(U), "dst": dst}
    entry = _journal(scene.dest, "_quarantine/", forged)
    source, held, dest = scene.locations()
    caplog.set_level(logging.WARNING)
    assert recover(dest, source, held, current, PartWriter(dest, 2), True, None) == (0, 0, 1)
    assert (scene.src / "b.png").read_bytes() == U and entry.exists()
    assert "is not inside the quarantine" in caplog.text

    (scene.held / "b.png").write_bytes(U)  # a copy inside the quarantine, but the entry names other bytes
    entry.write_text(json.dumps({**forged, "sha256": sha256(S), "dst": {**dst, "root": str(scene.held)}}))
    assert recover(dest, source, held, current, PartWriter(dest, 3), True, None) == (0, 0, 1)
    assert (scene.src / "b.png").read_bytes() == U and "no scan row with the sha256" in caplog.text


def test_an_interrupted_quarantine_inside_the_bounds_is_still_finished(scene):
    (scene.src / "c.png").write_bytes(U)
    (scene.held / "c.png").write_bytes(U)
    current = rows_table([_row(scene.src, "c.png", U, flagged=True, action="block")])
    dst = {"kind": "local", "root": str(scene.held), "key": "c.png"}
    entry = {"key": "c.png", "etag": current["etag"][0].as_py(), "size": len(U), "sha256": sha256(U), "dst": dst}
    path = _journal(scene.dest, "_quarantine/", entry)
    source, held, dest = scene.locations()
    assert recover(dest, source, held, current, PartWriter(dest, 2), True, None) == (1, 0, 0)
    assert not (scene.src / "c.png").exists() and (scene.held / "c.png").read_bytes() == U and not path.exists()


# --- the release race -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RacingStore(LocalStore):
    """A local store on which another writer replaces ``key`` right after a read of it returns (a forced race)."""

    key: str = ""
    then: bytes = b""
    fired: ClassVar[list[str]] = []

    def read(self, key, version=None):  # noqa: ANN001, ANN201
        out = super().read(key, version)
        if key == self.key and not self.fired:
            self.fired.append(key)
            tmp = Path(self.root, ".incoming")
            tmp.write_bytes(self.then)
            os.replace(tmp, Path(self.root, key))
        return out


def test_release_binds_the_row_to_the_bytes_it_verified_not_a_write_after_them(scene):
    RacingStore.fired.clear()
    (scene.held / "a.png").write_bytes(U)
    row = _row(scene.src, "a.png", U, flagged=True, action="block", quarantined_to=str(scene.held / "a.png"))
    current = rows_table([row])
    _, held, dest = scene.locations()
    DecisionLog(dest).append([_decision("a.png", U)])  # the reviewer overturned the scanned bytes
    source = Location(RacingStore(str(scene.src), key="a.png", then=S))
    report, _ = release(True, current, source, dest, PartWriter(dest, 2), None, held)
    assert report.done == 1 and RacingStore.fired == ["a.png"]
    assert (scene.src / "a.png").read_bytes() == S  # the racing write landed after the verification read
    committed = load_state(dest).current.to_pylist()[0]
    assert committed["etag"] != LocalStore(str(scene.src)).head("a.png").etag  # so the next scan rescores it
    assert committed["sha256"] == sha256(U) and committed["quarantined_to"] is None
    assert DecisionLog(dest).get("a.png", sha256(S)) is None  # the overturn never reaches the bytes written after


def test_release_refuses_a_row_whose_copy_is_outside_the_quarantine(scene):
    victim = scene.outside / "a.png"
    victim.write_bytes(U)
    current = rows_table([_row(scene.src, "a.png", U, flagged=True, action="block", quarantined_to=str(victim))])
    source, held, dest = scene.locations()
    DecisionLog(dest).append([_decision("a.png", U)])
    report, _ = release(True, current, source, dest, PartWriter(dest, 2), None, held)
    assert (report.done, report.failed) == (0, 1) and victim.exists() and not (scene.src / "a.png").exists()
