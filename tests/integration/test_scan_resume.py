"""A scan killed part-way (SIGKILL, with its own Ray) and rerun: the rest is scored, nothing twice, nothing lost."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.scan.shards import shard_ids
from tests.conftest import ROOT
from tests.integration.scan_support import (
    all_keys,
    new_bucket,
    png,
    put_many,
    results_layout,
    rows_by_key,
    summary,
)

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

N = 40


def start_scan(args: list[str], stall_after: int | None = None) -> subprocess.Popen:
    command = ["pipeline", "scan"] if stall_after is None else ["tests.stalling_scan", str(stall_after)]
    return subprocess.Popen(
        [sys.executable, "-m", *command, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its Ray processes too
    )


@pytest.mark.parametrize("shard_rows", [None, 8], ids=["one-shard", "8-shards"])
def test_killed_scan_resumes(s3, s3_endpoint, shard_rows):
    bucket = new_bucket(s3)
    images = {f"imgs/{i:03d}.png": png(700 + i) for i in range(N)}
    put_many(s3, bucket, images)
    dest = f"s3://{bucket}/results"
    args = [f"s3://{bucket}/imgs", "--output", dest, "--endpoint-url", s3_endpoint, "--json"]
    args += ["--batch-size", "4", "--part-rows", "4", "--dtype", "float32", "--device", "cpu"]
    if shard_rows:  # 40 objects in 8 shards: planned, finished and committed by Ray tasks
        args += ["--shard-rows", str(shard_rows)]

    proc = start_scan(args, stall_after=3)  # stalls after its third commit, mid-job
    deadline = time.monotonic() + 240
    parts: set[str] = set()
    while len(parts) < 3:
        assert proc.poll() is None, f"the scan ended before it could be killed:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no parts were committed in time"
        time.sleep(0.2)
        parts = {k for k in all_keys(s3, bucket, "results/parts/") if k.endswith(".parquet")}
    killed = proc.pid  # also its process group id
    os.killpg(killed, signal.SIGKILL)
    proc.communicate(timeout=60)
    # A worker outside the killed process group may still land a part it was writing: wait until the set is stable.
    parts, stable_since = set(), time.monotonic()
    while time.monotonic() - stable_since < 5:
        now = {k for k in all_keys(s3, bucket, "results/parts/") if k.endswith(".parquet")}
        if now != parts:
            parts, stable_since = now, time.monotonic()
        time.sleep(0.5)
    assert "results/_diffguard_scan.json" not in all_keys(s3, bucket, "results/")  # the run never completed
    committed = [pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=k)["Body"].read())) for k in parts]
    done = {key for table in committed for key in table["key"].to_pylist()}
    least = 3 if shard_rows else 12  # shards' work items make blocks that may end a batch short: parts of 1-4 rows
    assert least <= len(done) < N and sum(t.num_rows for t in committed) == len(done)

    proc = start_scan(args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert len(out.splitlines()) == 1, out  # Ray, its workers and the logs stay off stdout
    assert json.loads(out) == summary(N - len(done), len(done), 0, json.loads(out)["flagged"], 0, dest)

    rows = rows_by_key(dest, s3_endpoint)  # exactly one current row per object
    assert set(rows) == set(images)
    for table in committed:  # the killed run's committed rows count: they were not scored again
        for row in table.select(["key", "scanned_at"]).to_pylist():
            assert rows[row["key"]]["scanned_at"] == row["scanned_at"]
    layout = results_layout(all_keys(s3, bucket, "results/"), "results/")
    files = len(set(shard_ids(pa.array(list(images)), 8).tolist())) if shard_rows else 1  # one per non-empty shard
    assert layout == {"manifest": 1, "commits": 1, "data": files, "other": 0}  # run 2 completed: one Delta commit
    for _ in range(50):  # and the killed run left no process behind
        try:
            os.killpg(killed, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("processes of the killed scan are still running")
