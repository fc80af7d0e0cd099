"""The scan's shards without Ray: the key hash (stable across processes, even, independent of chunking), the split,
the per-shard plan against the whole-bucket plan, and a table kept one file per shard, rewritten only where a row
changed (a run in which nothing changed commits no file)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from pipeline.images import DecodeLimits
from pipeline.scan import commit as commit_module
from pipeline.scan import shards
from pipeline.scan.commit import Runner, compact, current_inputs, scatter_listing
from pipeline.scan.plan import LISTING_SCHEMA, plan
from pipeline.scan.shards import PLAN_COLUMNS, PlanSpec, plan_shard, shard_count, shard_ids, split
from pipeline.scan.state import PartWriter, load_meta, read_current, rows_table
from pipeline.storage import parse_location
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

KEYS = ["a.png", "", "ü/ñ.png", "x" * 1024, "dir/sub/0001.jpg", "a.png "] + [f"img/{i:07d}.png" for i in range(5000)]


def test_the_key_hash_is_the_same_in_another_process_and_for_any_chunking():
    here = shard_ids(pa.array(KEYS), 16).tolist()
    code = (
        "import json, sys, pyarrow as pa; from pipeline.scan.shards import shard_ids;"
        "print(json.dumps(shard_ids(pa.array(json.loads(sys.stdin.read())), 16).tolist()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(KEYS), capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(other.stdout) == here
    chunked = pa.chunked_array([pa.array(KEYS[:7]), pa.array(KEYS[7:100]), pa.array(KEYS[100:])])
    assert shard_ids(chunked, 16).tolist() == here
    assert shard_ids(pa.array(KEYS).slice(3), 16).tolist() == here[3:]  # an offset into the buffers
    assert shard_ids(pa.array(KEYS, pa.large_string()), 16).tolist() == here
    assert shard_ids(pa.array(KEYS), 1).tolist() == [0] * len(KEYS)


def test_keys_spread_evenly_over_the_shards():
    keys = pa.array([f"uploads/2026/{i:09d}.png" for i in range(160_000)])
    counts = np.bincount(shard_ids(keys, 16), minlength=16)
    assert counts.min() > 9_000 and counts.max() < 11_000, counts  # 10,000 each, give or take 10%


def test_shard_count_is_a_power_of_two_that_never_shrinks(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_ROWS", 1000)
    assert [shard_count(n) for n in (0, 1, 1000, 1001, 3000, 4001)] == [1, 1, 1, 2, 4, 8]
    assert shard_count(10, current=4) == 4


def test_split_keeps_every_row_once_in_its_order():
    table = pa.table({"key": KEYS, "i": range(len(KEYS))})
    parts = split(table, 8)
    ids = shard_ids(table["key"], 8)
    for s, part in enumerate(parts):
        assert part["i"].to_pylist() == [i for i in range(len(KEYS)) if ids[i] == s]
    assert split(table, 1) is table


def listing(n: int, changed: set[int] = frozenset()) -> pa.Table:
    t = datetime(2026, 11, 30, tzinfo=UTC)
    return pa.table(
        {
            "key": [f"k/{i:04d}.png" for i in range(n)],
            "etag": [f"e{i}" + ("-new" if i in changed else "") for i in range(n)],
            "size": [100 + i for i in range(n)],
            "last_modified": [t] * n,
            "version_id": [None] * n,
        },
        schema=LISTING_SCHEMA,
    )


def scanned(objects: pa.Table, fingerprint: str = "fp") -> pa.Table:
    limits = DecodeLimits()
    rows = objects.to_pylist()
    for r in rows:
        r.update(model_fingerprint=fingerprint, max_pixels=limits.max_pixels, max_object_bytes=limits.max_bytes)
        r.update(flagged=False, quarantined_to=None, tagged=False)
    return rows_table(rows)


def test_the_plan_shard_by_shard_is_the_whole_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_ROWS", 16)
    dest = parse_location(str(tmp_path / "dest"))
    PartWriter(dest, 1).commit(scanned(listing(100)))
    compact(dest, 1, "src", listing(100)["key"], {})
    PartWriter(dest, 2).commit(scanned(listing(3)).slice(1, 1))  # a staged row of a killed run 2
    now = listing(120, changed={5, 50, 99})  # 20 new, 3 changed
    spec = PlanSpec("fp", DecodeLimits(), False, None)
    whole, unchanged, _ = plan(now, read_current(dest, non_images=True), "fp", DecodeLimits(), False)

    runner, n = Runner(), 8
    inputs = current_inputs(runner, dest, load_meta(dest), n, PLAN_COLUMNS)
    listed = scatter_listing(runner, [now], n)
    planned = [
        plan_shard(spec, len(listed[s]), len(inputs.table[s]), *listed[s], *inputs.table[s], *inputs.staged[s])
        for s in range(n)
    ]
    todo = sorted(k for t, _ in planned for k in t["key"].to_pylist())
    assert todo == whole["key"].to_pylist() and len(todo) == 23
    assert sum(c["unchanged"] for _, c in planned) == unchanged == 97
    assert sum(c["staged"] for _, c in planned) == 1
    assert {"last_modified_us", "whole"} <= set(planned[0][0].column_names)


def log_actions(dest, version: int) -> tuple[list[str], list[str]]:
    lines = (dest / "results" / "_delta_log" / f"{version:020d}.json").read_text().splitlines()
    actions = [json.loads(line) for line in lines]
    return [a["add"]["path"] for a in actions if "add" in a], [a["remove"]["path"] for a in actions if "remove" in a]


def test_the_table_is_one_file_per_shard_and_only_changed_shards_are_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_ROWS", 16)
    path = tmp_path / "dest"
    dest = parse_location(str(path))
    PartWriter(dest, 1).commit(scanned(listing(100)))
    compact(dest, 1, "src", listing(100)["key"], {})
    adds, removes = log_actions(path, 0)
    assert len(adds) == 8 and not removes and all(a.endswith("-of-00008-r000001.zstd.parquet") for a in adds)
    assert DeltaTable(str(path / "results")).to_pyarrow_table().num_rows == 100

    changed = listing(100, changed={7})
    PartWriter(dest, 2).commit(scanned(changed).slice(7, 1))
    compact(dest, 2, "src", changed["key"], {})
    adds, removes = log_actions(path, 1)
    shard = shard_ids(pa.array(["k/0007.png"]), 8)[0]
    assert adds == [f"shard-{shard:05d}-of-00008-r000002.zstd.parquet"] and len(removes) == 1
    assert (
        read_current(dest).num_rows == 100
        and dict(zip(read_current(dest)["key"].to_pylist(), read_current(dest)["etag"].to_pylist(), strict=True))[
            "k/0007.png"
        ]
        == "e7-new"
    )

    calls = []
    real = commit_module.finish_shard
    monkeypatch.setattr(commit_module, "finish_shard", lambda *a: calls.append(a[1]) or real(*a))
    compact(dest, 3, "src", changed["key"], {})  # nothing changed: the run is recorded, no file written
    assert (
        log_actions(path, 2) == ([], [])
        and DeltaTable(str(path / "results")).transaction_version("diffguard-scan") == 3
    )
    assert len(calls) == 8  # compact visits every shard; the scan's driver skips unchanged ones (plan counts)

    compact(dest, 4, "src", changed["key"][:90], {})  # ten objects deleted from the source
    adds, removes = log_actions(path, 3)
    gone = set(shard_ids(changed["key"][90:], 8).tolist())
    assert len(adds) == len(removes) == len(gone) and read_current(dest).num_rows == 90


def test_a_table_written_before_shards_is_cut_into_them_once(tmp_path, monkeypatch):
    """A DEST from the previous version (its Delta table one write_deltalake file per run) reads the same and is
    rewritten into shard files by the next run, every row kept."""
    from pipeline.scan.table import commit

    monkeypatch.setattr(shards, "SHARD_ROWS", 16)
    path = tmp_path / "dest"
    dest = parse_location(str(path))
    before = scanned(listing(40))
    commit(dest, before, 1)  # how the previous version committed a run
    (path / "_diffguard_scan.json").write_text(json.dumps({"format": 2, "source": "src", "table": "results"}))
    assert [a for a, _ in load_meta(dest).files][0].startswith("part-")
    assert read_current(dest).num_rows == 40

    compact(dest, 2, "src", listing(40)["key"], {})
    adds, removes = log_actions(path, 1)
    assert len(removes) == 1 and len(adds) == 4 and all(a.startswith("shard-") and "-of-00004-" in a for a in adds)
    assert read_current(dest).select(["key", "etag"]).to_pylist() == before.select(["key", "etag"]).to_pylist()
