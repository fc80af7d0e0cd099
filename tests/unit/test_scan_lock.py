"""One scan per DEST (issue 25 item 4): DEST's lock, the driver's exclusive parts, and the run id in the Delta commit.

Without Ray: the lock is taken, refused, taken over (stale, dead holder, ``--break-lock``) and released on a local DEST;
the CLI exits 2 on a busy DEST before it starts anything; a part of another writer is never overwritten; a failed
commit counts as ours only with our run id.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pyarrow as pa
import pytest

from pipeline.errors import DestBusy, ObjectExists, StorageError
from pipeline.scan import lock as lockmod
from pipeline.scan import table as tablemod
from pipeline.scan.lock import LOCK, DestLock, Holder
from pipeline.scan.state import PartWriter, WorkerParts, _write_part, rows_table
from pipeline.storage import LocalStore, parse_location

pytestmark = pytest.mark.unit


def foreign(**changes) -> Holder:
    """A lock another scan, on another host, took an hour ago and refreshed a moment ago."""
    fields = dict(
        run_id="f" * 32,
        run=8,
        user="ana",
        host="host1",
        pid=4242,
        started_at="2026-12-05T09:00:00Z",
        heartbeat_at=lockmod._stamp(lockmod._now()),
        machine="another-boot/1",
    )
    return Holder(**(fields | changes))


def put_lock(dest, holder: Holder) -> None:
    (dest / LOCK).write_bytes(holder.encode())


def on_file(dest) -> dict:
    return json.loads((dest / LOCK).read_text())


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_held_lock_refuses_a_second_scan_and_is_released(tmp_path):
    dest = parse_location(str(tmp_path))
    with DestLock.acquire(dest) as first:
        assert first.claim(3) == 3
        held = on_file(tmp_path)
        assert held["run_id"] == first.run_id and held["run"] == 3 and held["pid"] > 0
        assert held["host"] == socket.gethostname() and held["user"] and held["started_at"].endswith("Z")
        with pytest.raises(DestBusy) as busy:
            DestLock.acquire(dest)  # this process is alive and holds it: never taken over
        message = str(busy.value)
        assert f"DEST {tmp_path} is busy: run 3 (id {first.run_id[:8]}" in message
        assert f"@{socket.gethostname()} pid {held['pid']} since {held['started_at']}" in message
        assert "--break-lock" in message and "10 minutes" in message
        assert on_file(tmp_path)["run_id"] == first.run_id  # the refused scan wrote nothing
    assert not (tmp_path / LOCK).exists()  # released at the end
    DestLock.acquire(dest).release()  # and free again


def test_busy_error_pickles_and_exits_2(tmp_path, capsys):
    from pipeline.cli import main

    assert pickle.loads(pickle.dumps(DestBusy("x"))).message == "x"
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    put_lock(dest, foreign())
    assert main(["scan", str(src), "--output", str(dest)]) == 2  # before Ray, the model or any write
    err = capsys.readouterr().err
    assert f"DEST {dest} is busy: run 8 (id ffffffff…) by ana@host1 pid 4242 since 2026-12-05T09:00:00Z" in err
    assert sorted(p.name for p in dest.iterdir()) == [LOCK]


def test_the_cli_breaks_a_lock_when_asked(tmp_path, caplog):
    """`diffguard scan --break-lock` (the flag the busy message names) reaches the lock: the run takes it over."""
    from pipeline.cli import main

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    put_lock(dest, foreign())
    with caplog.at_level(logging.WARNING, logger="diffguard"):
        assert main(["scan", str(src), "--output", str(dest), "--break-lock", "--device", "cpu"]) == 0  # none to read
    assert any("(--break-lock)" in r.getMessage() and "ana@host1" in r.getMessage() for r in caplog.records)
    assert not (dest / LOCK).exists()  # released at the end of the run


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dest = parse_location(str(tmp_path))
    hour_ago = lockmod._stamp(lockmod._now() - timedelta(hours=1))
    put_lock(tmp_path, foreign(heartbeat_at=hour_ago))
    with caplog.at_level(logging.WARNING, logger="diffguard"), DestLock.acquire(dest) as lock:
        assert on_file(tmp_path)["run_id"] == lock.run_id
    warning = next(r.getMessage() for r in caplog.records if "taking over" in r.getMessage())
    assert "run 8 (id ffffffff…) by ana@host1 pid 4242" in warning and "no heartbeat for 60 minutes" in warning


def test_break_lock_takes_a_live_lock_only_when_asked(tmp_path, caplog):
    dest = parse_location(str(tmp_path))
    put_lock(tmp_path, foreign())
    with pytest.raises(DestBusy):
        DestLock.acquire(dest)
    with caplog.at_level(logging.WARNING, logger="diffguard"), DestLock.acquire(dest, break_lock=True) as lock:
        assert on_file(tmp_path)["run_id"] == lock.run_id
    assert any("(--break-lock)" in r.getMessage() and "ana@host1" in r.getMessage() for r in caplog.records)


def test_two_breakers_one_wins(tmp_path, monkeypatch):
    """Both read the same old lock; the first replaces it; the second's guarded delete misses, and it finds the
    winner's live lock, which its --break-lock (meant for the old one) does not break."""
    dest = parse_location(str(tmp_path))
    put_lock(tmp_path, foreign())
    read, winner = lockmod._read, {}

    def read_then_lose_the_race(location):
        found = read(location)
        if not winner:  # the other breaker lands between this one's read and its delete
            winner["lock"] = None
            winner["lock"] = DestLock.acquire(dest, break_lock=True)
        return found

    monkeypatch.setattr(lockmod, "_read", read_then_lose_the_race)
    with pytest.raises(DestBusy) as busy:
        DestLock.acquire(dest, break_lock=True)
    won = winner["lock"]
    assert f"(id {won.run_id[:8]}…)" in str(busy.value)
    assert on_file(tmp_path)["run_id"] == won.run_id  # the winner's lock was not broken
    won.release()


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    dest = parse_location(str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = dict(host=socket.gethostname(), machine=lockmod._machine())
    put_lock(tmp_path, foreign(pid=int(gone.stdout), **here))  # heartbeat fresh, but its process has exited
    with caplog.at_level(logging.WARNING, logger="diffguard"), DestLock.acquire(dest) as lock:
        assert on_file(tmp_path)["run_id"] == lock.run_id
    assert any(f"its process {int(gone.stdout)} on this host is gone" in r.getMessage() for r in caplog.records)

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        put_lock(tmp_path, foreign(pid=alive.pid, **here))
        with pytest.raises(DestBusy):
            DestLock.acquire(dest)
    finally:
        alive.kill()
        alive.wait()


def test_a_lock_whose_run_id_changed_is_not_deleted_by_the_old_holder(tmp_path, caplog):
    dest = parse_location(str(tmp_path))
    old = DestLock.acquire(dest, heartbeat_s=0.05)
    old.claim(4)
    put_lock(tmp_path, foreign(run=5))  # taken over meanwhile (a --break-lock elsewhere)
    with caplog.at_level(logging.ERROR, logger="diffguard"):
        wait_for(lambda: not old._thread.is_alive(), "the heartbeat did not stop on a foreign lock")
        with pytest.raises(StorageError, match="lost its lock to run 5"):
            old.check()  # the run refuses to commit
        old.release()
    assert on_file(tmp_path)["run_id"] == "f" * 32  # the new holder's lock stays
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("no longer holds its lock" in m for m in errors) and any("left alone" in m for m in errors)


def test_heartbeat_refreshes_the_lock(tmp_path):
    dest = parse_location(str(tmp_path))
    with DestLock.acquire(dest, heartbeat_s=0.05) as lock:
        put_lock(tmp_path, Holder(**{**on_file(tmp_path), "heartbeat_at": "2000-01-01T00:00:00Z"}))
        wait_for(lambda: on_file(tmp_path)["heartbeat_at"] != "2000-01-01T00:00:00Z", "no heartbeat was written")
        assert on_file(tmp_path)["run_id"] == lock.run_id and lock._thread.is_alive()


def test_a_retried_create_of_our_own_lock_holds_it(tmp_path, monkeypatch):
    """The create landed but its answer was lost; the retry is refused: the lock found is ours."""
    create = LocalStore.create

    def landed_then_refused(self, key, data):
        create(self, key, data)
        raise ObjectExists(f"{key} already exists")

    monkeypatch.setattr(LocalStore, "create", landed_then_refused)
    with DestLock.acquire(parse_location(str(tmp_path))) as lock:
        assert on_file(tmp_path)["run_id"] == lock.run_id


def test_driver_parts_are_never_overwritten(tmp_path):
    dest = parse_location(str(tmp_path))
    ours, theirs = rows_table([{"key": "a.png", "etag": "1"}]), rows_table([{"key": "b.png", "etag": "2"}])
    rel = "parts/run-000002/part-000000.parquet"
    _write_part(dest, rel, theirs)  # another scan's part 0 of run 2
    before = (tmp_path / rel).read_bytes()
    with pytest.raises(StorageError, match="written by another writer"):
        PartWriter(dest, 2).commit(ours)
    assert (tmp_path / rel).read_bytes() == before

    _write_part(dest, "parts/run-000003/part-000000.parquet", ours)  # our own write whose answer was lost
    writer = PartWriter(dest, 3)
    assert writer.commit(ours) == "parts/run-000003/part-000000.parquet" and writer.parts == 1
    worker = WorkerParts(dest, 3, 1)  # a worker's part: a retried task rewrites its own file
    assert worker.commit(ours) == worker.commit(ours.append_column("x", pa.array([1])))


def test_a_failed_commit_is_ours_only_with_our_run_id(tmp_path):
    dest = parse_location(str(tmp_path))
    rows = rows_table([{"key": "a.png", "etag": "1"}])
    version = tablemod.commit(dest, rows, 2, run_id="a" * 32)
    dt = tablemod.open_table(dest)
    assert tablemod.commit_run_id(dest, version) == "a" * 32 and dt.history(limit=1)[0]["diffguard.run_id"] == "a" * 32
    lost = OSError("the answer was lost")
    assert tablemod._committed(dest, 2, "a" * 32, lost) == version  # ours: it landed
    with pytest.raises(StorageError, match="cannot commit run 2"):
        tablemod._committed(dest, 2, "b" * 32, lost)  # another scan's run 2: not ours
    with pytest.raises(StorageError, match="changed while run 2 committed"):
        tablemod._committed(dest, 2, "b" * 32)

    old = parse_location(str(tmp_path / "old"))
    tablemod.commit(old, rows, 2)  # as older scans committed: no run id
    assert tablemod.commit_run_id(old, 0) is None
    assert tablemod._committed(old, 2, None, lost) == 0  # readable and judged as before
    with pytest.raises(StorageError, match="cannot commit run 2"):
        tablemod._committed(old, 2, "b" * 32, lost)


def test_commit_files_records_the_run_id(tmp_path):
    from pipeline.scan.state import ROW_SCHEMA

    dest = parse_location(str(tmp_path))
    tablemod.commit_files(dest, [], [], 1, ROW_SCHEMA, overwrite=True, run_id="c" * 32)
    tablemod.commit_files(dest, [], [], 2, ROW_SCHEMA, overwrite=False, run_id="d" * 32)
    dt = tablemod.open_table(dest)
    assert (tablemod.table_run(dt), tablemod.commit_run_id(dest, dt.version())) == (2, "d" * 32)
    assert tablemod.commit_run_id(dest, 0) == "c" * 32


def test_a_retry_waits_for_a_dead_clusters_lock_to_go_stale_then_takes_it(tmp_path, caplog, monkeypatch):
    """A RayJob retry on a new cluster finds the lock of the attempt that died with the old one (another host, so not
    provably dead): with ``wait_s`` it tries again until the lock goes stale, then takes it; without, it is busy."""
    dest = parse_location(str(tmp_path))
    # by a driver that will never beat again; stamped 3 s ahead (whole seconds), so it is fresh for at least the
    # first 2 s whatever this machine's speed, and stale (1 s) a few seconds later
    put_lock(tmp_path, foreign(heartbeat_at=lockmod._stamp(lockmod._now() + timedelta(seconds=3))))
    with pytest.raises(DestBusy):
        DestLock.acquire(dest, stale_s=1.0)
    tries = []
    real = DestLock._acquire.__func__

    def counted(cls, *args):
        tries.append(time.monotonic())
        return real(cls, *args)

    monkeypatch.setattr(DestLock, "_acquire", classmethod(counted))
    with (
        caplog.at_level(logging.WARNING, logger="diffguard"),
        DestLock.acquire(dest, stale_s=1.0, wait_s=30, poll_s=0.2) as lock,
    ):
        assert on_file(tmp_path)["run_id"] == lock.run_id
    assert len(tries) >= 2  # refused while fresh, taken once stale
    messages = [r.getMessage() for r in caplog.records]
    assert sum("waiting up to" in m for m in messages) == 1  # said once, not at every try
    assert any("taking over" in m and "no heartbeat" in m for m in messages)


def test_a_live_holder_outlasts_the_wait(tmp_path):
    dest = parse_location(str(tmp_path))
    with DestLock.acquire(dest, heartbeat_s=0.1):  # a live scan, beating
        start = time.monotonic()
        with pytest.raises(DestBusy, match="is busy"):
            DestLock.acquire(dest, stale_s=5, wait_s=1.0, poll_s=0.1)
        assert time.monotonic() - start >= 1.0  # it tried for the whole wait (a lower bound, not a speed)
