"""A scan cut into shards, as a large bucket is (here by ``--shard-rows 8``: 8 shards of 42 objects): planned,
acted on and committed by Ray tasks, against the same scan done in the driver as one shard. Same rows, the
quarantine moved by tasks with its guarantees, and the table one file per shard, rewritten only where a row changed."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

from pipeline.scan.shards import shard_ids
from tests.integration.scan_support import checker_at, mixed_adjustment, png, rows_by_key, scan, summary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VOLATILE = ("scanned_at", "bucket", "quarantined_to", "etag", "last_modified")  # differ between two copies of SOURCE


def comparable(rows: dict[str, dict]) -> dict[str, dict]:
    return {k: {c: v for c, v in r.items() if c not in VOLATILE} for k, r in rows.items()}


def log_files(dest) -> list[tuple[list[str], list[str]]]:
    """(added, removed) data files of each Delta commit, oldest first."""
    out = []
    for path in sorted((dest / "results" / "_delta_log").glob("*.json")):
        actions = [json.loads(line) for line in path.read_text().splitlines()]
        out.append(
            (
                sorted(a["add"]["path"] for a in actions if "add" in a),
                sorted(a["remove"]["path"] for a in actions if "remove" in a),
            )
        )
    return out


@pytest.mark.usefixtures("ray_cluster")
def test_a_sharded_scan_equals_the_one_shard_scan(tmp_path, capsys, checker):
    src = tmp_path / "src"
    images = {f"d{i % 5}/{i:03d}.png": png(1560 + i) for i in range(40)}
    for rel, data in images.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "notes.txt").write_text("not an image")
    (src / "zero.png").write_bytes(b"")
    twin = tmp_path / "twin"
    shutil.copytree(src, twin)
    adjustment = mixed_adjustment(checker, list(images.values()))
    flagged = {k for k, v in zip(images, checker_at(adjustment).check(list(images.values())), strict=True) if v.nsfw}
    assert 0 < len(flagged) < len(images)

    def run(source, dest, *extra):
        rc, out = scan(capsys, str(source), "--output", str(dest), "--adjustment", str(adjustment), *extra)
        assert rc == 0
        return out

    one = run(twin, tmp_path / "one")  # 42 objects: one shard, planned and committed in the driver
    assert log_files(tmp_path / "one")[-1][0] == ["shard-00000-of-00001-r000001.zstd.parquet"]

    dest = tmp_path / "dest"
    out = run(src, dest, "--shard-rows", "8")
    assert out == {**one, "output": str(dest)} == summary(41, 0, 1, len(flagged) + 1, 1, str(dest))
    assert comparable(rows_by_key(str(dest))) == comparable(rows_by_key(str(tmp_path / "one")))
    ((added, removed),) = log_files(dest)
    assert len(added) == 8 and not removed and all("-of-00008-r000001" in a for a in added)  # 42 objects -> 8 shards

    assert run(src, dest) == summary(0, 41, 1, 0, 0, str(dest))  # the table's 8 shards are kept
    assert log_files(dest)[-1] == ([], [])  # nothing changed: the run is recorded, no file written or removed

    # one object rewritten, one deleted: only their shards get new files
    (src / "d0/000.png").write_bytes(png(4242))
    (src / "d1/001.png").unlink()
    out = run(src, dest)
    assert out["scanned"] == 1 and out["skipped_unchanged"] == 39
    touched = set(shard_ids(pa.array(["d0/000.png", "d1/001.png"]), 8).tolist())
    added, removed = log_files(dest)[-1]
    assert len(added) == len(removed) == len(touched)
    assert {int(a[6:11]) for a in added} == touched
    rows = rows_by_key(str(dest))
    assert "d1/001.png" not in rows and len(rows) == 40

    # quarantine --apply: the moves run in the shard tasks, journalled, verified, originals deleted
    held = tmp_path / "held"
    out = run(src, dest, "--quarantine", str(held), "--apply")
    rows = rows_by_key(str(dest))
    moved = {k for k, r in rows.items() if r["quarantined_to"]}
    assert moved == {k for k, r in rows.items() if r["flagged"]} and moved
    for key in moved:
        assert not (src / key).exists() and rows[key]["quarantined_to"] == str(held / key)
        assert (held / key).read_bytes() == (b"" if key == "zero.png" else images.get(key, png(4242)))
    assert not list((dest / "_quarantine").glob("*.json"))  # every journal entry resolved
    assert not list((dest / "parts").rglob("*.parquet"))  # the action's parts folded in, then deleted
    again = run(src, dest, "--quarantine", str(held), "--apply")
    assert again["scanned"] == 0 and rows_by_key(str(dest)) == rows  # moved objects stay recorded, nothing redone
