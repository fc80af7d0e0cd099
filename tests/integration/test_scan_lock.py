"""One scan per DEST (issue 25 item 4): a second scan on a busy DEST exits 2 naming the holder while the first one
completes with nothing lost; library callers of ``run_scan`` get the same lock; the lock on S3 (moto over HTTP)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.errors import DestBusy, StorageError
from pipeline.scan import lock as lockmod
from pipeline.scan.lock import LOCK, DestLock, Holder
from pipeline.scan.state import PartWriter, _write_part, rows_table
from pipeline.storage import parse_location
from tests.conftest import ROOT
from tests.integration.scan_support import new_bucket, png, rows_by_key

N = 24


def images_in(src: Path) -> dict[str, bytes]:
    images = {f"imgs/{i:03d}.png": png(900 + i) for i in range(N)}
    for rel, data in images.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return images


def other_holder(**changes) -> Holder:
    """A live scan on another host."""
    now = lockmod._stamp(lockmod._now())
    fields = dict(run_id="e" * 32, run=1, user="ana", host="host1", pid=4242, started_at=now, heartbeat_at=now)
    return Holder(**(fields | changes))


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_second_scan_on_a_busy_dest_exits_2_and_the_first_completes(tmp_path):
    src, dest, go = tmp_path / "src", tmp_path / "dest", tmp_path / "go"
    images = images_in(src)
    args = [str(src), "--output", str(dest), "--json", "--batch-size", "4", "--part-rows", "4"]
    args += ["--dtype", "float32", "--device", "cpu"]
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.stalling_scan", "2", *args],
        cwd=ROOT,
        env={**os.environ, "STALL_UNTIL": str(go)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group (and Ray): the clean-up kill takes all of it
    )
    try:
        deadline = time.monotonic() + 240
        while len([p for p in files_under(dest) if p.startswith("parts/") and p.endswith(".parquet")]) < 2:
            assert first.poll() is None, f"the first scan ended early:\n{first.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the first scan committed no parts in time"
            time.sleep(0.2)
        held = json.loads((dest / LOCK).read_text())
        parts = {p: (dest / p).read_bytes() for p in files_under(dest) if p.startswith("parts/")}

        second = subprocess.run(
            [sys.executable, "-m", "pipeline", "scan", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stdout == ""
        holder = f"run 1 (id {held['run_id'][:8]}…) by {held['user']}@{held['host']}"
        assert f"DEST {dest} is busy: {holder}" in second.stderr
        assert f"pid {first.pid} since {held['started_at']}" in second.stderr and "--break-lock" in second.stderr
        for rel, data in parts.items():  # the refused scan touched nothing
            assert (dest / rel).read_bytes() == data, rel

        go.touch()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    assert first.returncode == 0, err[-3000:]
    assert json.loads(out)["scanned"] == N
    rows = rows_by_key(str(dest))
    assert set(rows) == set(images) and all(r["error"] is None for r in rows.values())  # every row, once
    left = files_under(dest)
    assert LOCK not in left and not any(p.startswith("parts/") for p in left)  # released; every part folded in
    assert "_diffguard_scan.json" in left


@pytest.mark.usefixtures("ray_cluster")
def test_run_scan_holds_the_lock_for_library_callers(tmp_path, caplog):
    from pipeline.scan import ScanConfig, run_scan
    from pipeline.spec import CheckerSpec

    src, dest = tmp_path / "src", tmp_path / "dest"
    images = images_in(src)
    dest.mkdir()
    (dest / LOCK).write_bytes(other_holder().encode())
    cfg = ScanConfig(str(src), str(dest), CheckerSpec(dtype="float32", device="cpu"))
    with pytest.raises(DestBusy, match="by ana@host1 pid 4242"):
        run_scan(cfg)
    assert files_under(dest) == {LOCK}

    with caplog.at_level(logging.WARNING, logger="diffguard"):
        summary = run_scan(replace(cfg, break_lock=True))
    assert summary.scanned == N and summary.run == 1
    assert any("taking over the lock of run 1" in r.getMessage() for r in caplog.records)
    assert LOCK not in files_under(dest) and set(rows_by_key(str(dest))) == set(images)

    hour_ago = lockmod._stamp(lockmod._now() - timedelta(hours=1))
    (dest / LOCK).write_bytes(other_holder(run=7, heartbeat_at=hour_ago).encode())  # a killed scan's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffguard"):
        assert run_scan(cfg).run == 2
    assert any("run 7" in r.getMessage() and "no heartbeat for 60 minutes" in r.getMessage() for r in caplog.records)
    assert LOCK not in files_under(dest)


def test_lock_and_driver_parts_on_s3(s3, s3_endpoint, caplog):
    bucket = new_bucket(s3)
    dest = parse_location(f"s3://{bucket}/results", s3_endpoint)
    lock = DestLock.acquire(dest)
    lock.claim(3)
    with pytest.raises(DestBusy, match=f"run 3 \\(id {lock.run_id[:8]}"):
        DestLock.acquire(dest)
    lock.release()
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0

    hour_ago = lockmod._stamp(lockmod._now() - timedelta(hours=1))
    s3.put_object(Bucket=bucket, Key=f"results/{LOCK}", Body=other_holder(heartbeat_at=hour_ago).encode())
    with caplog.at_level(logging.WARNING, logger="diffguard"), DestLock.acquire(dest) as taker:
        body = s3.get_object(Bucket=bucket, Key=f"results/{LOCK}")["Body"].read()
        assert json.loads(body)["run_id"] == taker.run_id
    assert any("taking over the lock of run 1" in r.getMessage() for r in caplog.records)

    rel = "parts/run-000002/part-000000.parquet"
    _write_part(dest, rel, rows_table([{"key": "b.png", "etag": "2"}]))  # another writer's
    with pytest.raises(StorageError, match="written by another writer"):
        PartWriter(dest, 2).commit(rows_table([{"key": "a.png", "etag": "1"}]))
    assert PartWriter(dest, 2).commit(rows_table([{"key": "b.png", "etag": "2"}])) == rel  # the same bytes: ours
