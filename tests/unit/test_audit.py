"""The audit log (pipeline.audit) on a local directory: rows durable and read back by diffguard, pandas and duckdb,
group commit, a failed group, two writer processes at once, a writer killed mid-stream, compaction, retention and
``diffguard audit``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.audit import (
    SCHEMA,
    AuditLog,
    compact,
    open_log,
    parse_duration,
    parse_since,
    read,
    table_uri,
    vacuum,
)
from pipeline.audit.table import location
from pipeline.cli import main
from pipeline.errors import AuditUnavailable, InvalidInput
from tests.conftest import ROOT

DIGEST = hashlib.sha256(b"pixels").hexdigest()


def image(action: str = "allow", flagged: tuple[str, ...] = ()) -> dict:
    return {
        "sha256": None if action == "block" else DIGEST,
        "filename": "a.png",
        "nsfw": bool(flagged),
        "flagged": list(flagged),
        "categories": json.dumps({c: 0.5 for c in flagged}),
        "action": action,
        "views": 1,
        "error": None,
    }


def row(request_id: str, *, tenant: str = "acme", when: datetime | None = None, actions=("allow",), **fields) -> dict:
    base = {
        "time": when or datetime.now(UTC),
        "request_id": request_id,
        "key_id": "key-1",
        "tenant": tenant,
        "route": "moderate",
        "status": 200,
        "latency_ms": 12.5,
        "prompt_sha256": None,
        "prompt": None,
        "seed": None,
        "params": None,
        "images": [image(a, ("sexual",) if a != "allow" else ()) for a in actions],
        "policy": "default",
        "policy_fingerprint": "fp-1",
        "models": {"checker": "tiny"},
        "error": None,
    }
    return base | fields


def ids(dest) -> list[str]:
    return [r["request_id"] for r in read(dest)]


def commits(dest) -> int:
    return len([p for p in Path(table_uri(location(str(dest))), "_delta_log").glob("*.json")])


def test_rows_are_durable_and_read_back_by_diffguard_pandas_and_duckdb(tmp_path):
    import duckdb

    dest = tmp_path / "audit-dest"
    first = row("mod-1", tenant="kids", status=422, latency_ms=None, images=[], error="bad image")
    generated = row(
        "gen-1",
        route="generate",
        prompt_sha256=hashlib.sha256(b"a cat").hexdigest(),
        prompt="a cat",
        seed=7,
        params={"steps": 4, "width": 64},
        actions=("allow", "blur"),
    )
    with AuditLog(str(dest), replica="ingress-1") as audit:
        audit.record_sync(generated)  # written first, read back in `time` order
        audit.record_sync(first)
    got = read(str(dest))
    assert [r["request_id"] for r in got] == ["mod-1", "gen-1"]  # oldest first
    mod, gen = got
    assert mod["status"] == 422 and mod["images"] == [] and mod["error"] == "bad image" and mod["latency_ms"] is None
    assert gen["time"] == generated["time"] and gen["day"] == generated["time"].strftime("%Y-%m-%d")
    assert gen["replica"] == "ingress-1" and gen["seed"] == 7 and gen["prompt"] == "a cat"
    assert json.loads(gen["params"]) == {"steps": 4, "width": 64} and json.loads(gen["models"]) == {"checker": "tiny"}
    assert [i["action"] for i in gen["images"]] == ["allow", "blur"]
    assert gen["images"][1] == image("blur", ("sexual",)) | {"categories": '{"sexual": 0.5}'}

    dt = open_log(location(str(dest)))
    assert dt.metadata().partition_columns == ["day"]
    assert dt.schema().to_arrow().names == SCHEMA.names
    df = dt.to_pandas()
    assert sorted(df["request_id"]) == ["gen-1", "mod-1"] and set(df["tenant"]) == {"kids", "acme"}
    # duckdb reads the Arrow dataset by its variable's name (duckdb's delta extension needs the network)
    audit_rows = dt.to_pyarrow_dataset()  # noqa: F841
    hits = duckdb.sql(
        "select request_id, i.action from audit_rows, unnest(images) as t(i) where i.action <> 'allow'"
    ).fetchall()
    assert hits == [("gen-1", "blur")]


def test_concurrent_records_are_written_as_one_group(tmp_path):
    async def burst(audit: AuditLog) -> None:
        await asyncio.gather(*(audit.record(row(f"r{i:03d}")) for i in range(100)))

    dest = str(tmp_path)
    with AuditLog(dest) as first:
        first.record_sync(row("first"))  # creates the table
    before = commits(dest)
    with AuditLog(dest, max_delay_s=10, max_rows=100) as audit:  # the group is full at 100 rows, long before 10 s
        asyncio.run(burst(audit))
        assert (audit.groups, audit.rows, audit.failed_groups) == (1, 100, 0)
    assert commits(dest) == before + 1  # one log commit for the 100 rows
    assert sorted(ids(dest)) == sorted(["first", *(f"r{i:03d}" for i in range(100))])
    data_files = list(Path(table_uri(location(dest))).rglob("*.parquet"))
    assert len(data_files) == 2


def test_small_groups_form_while_a_group_commits(tmp_path):
    async def callers(audit: AuditLog) -> None:
        async def caller(c: int) -> None:
            for i in range(20):
                await audit.record(row(f"c{c}-{i}"))

        await asyncio.gather(*(caller(c) for c in range(10)))

    with AuditLog(str(tmp_path), max_delay_s=0.05) as audit:
        asyncio.run(callers(audit))
        assert audit.rows == 200 and audit.groups < 200  # 10 callers, each waiting for its row: groups of several
    assert len(ids(tmp_path)) == 200


def test_a_failed_write_fails_every_waiter_of_its_group(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    async def burst(audit: AuditLog) -> list:
        return await asyncio.gather(*(audit.record(row(f"r{i}")) for i in range(20)), return_exceptions=True)

    with AuditLog(str(blocker / "audit"), max_delay_s=10, max_rows=20) as audit:
        results = asyncio.run(burst(audit))
        assert (audit.groups, audit.failed_groups) == (0, 1)
    with AuditLog(str(blocker / "audit")) as single, pytest.raises(AuditUnavailable, match="could not be written"):
        single.record_sync(row("sync"))
    assert all(isinstance(r, AuditUnavailable) for r in results), results
    err = results[0]
    assert err.status_code == 503 and str(blocker) in str(err)
    again = pickle.loads(pickle.dumps(err))  # crosses Ray process boundaries
    assert type(again) is AuditUnavailable and again.message == err.message
    with pytest.raises(AuditUnavailable, match="closed"):
        audit.record_sync(row("after-close"))


def test_a_bad_row_is_refused_naming_the_field(tmp_path):
    with AuditLog(str(tmp_path)) as audit:
        with pytest.raises(ValueError, match=r"`route` is 'upload'.*allowed: generate \| moderate"):
            audit.record_sync(row("x", route="upload"))
        with pytest.raises(ValueError, match="`time` is .*allowed: a timezone-aware datetime"):
            audit.record_sync(row("x", when=datetime(2025, 1, 1)))
        with pytest.raises(ValueError, match=r"missing keys \['seed'\], unknown keys \['extra'\]"):
            audit.record_sync({k: v for k, v in row("x", extra=1).items() if k != "seed"})
        with pytest.raises(ValueError, match=r"images\[0\]\.views"):
            audit.record_sync(row("x", images=[image() | {"views": -1}]))
        audit.record_sync(row("ok"))
        assert audit.failed_groups == 0
    assert ids(tmp_path) == ["ok"]


def writer_main() -> None:
    """A writer process (run by the tests below): ``DEST PREFIX COUNT``; prints each request id once it is durable.
    COUNT 0: forever."""
    dest, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def run() -> None:
        with AuditLog(dest, replica=prefix) as audit:
            i = 0
            while count == 0 or i < count:
                batch = [f"{prefix}-{i + k}" for k in range(5)]
                await asyncio.gather(*(audit.record(row(rid)) for rid in batch))
                print("\n".join(batch), flush=True)
                i += 5

    asyncio.run(run())


def writer(dest, prefix: str, count: int) -> subprocess.Popen:
    code = "from tests.unit.test_audit import writer_main; writer_main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(dest), prefix, str(count)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_writer_processes_append_to_one_table_at_once(tmp_path):
    procs = [writer(tmp_path, name, 100) for name in ("a", "b")]  # both create the table, then race for versions
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    printed = [line for out, _ in outs for line in out.split()]
    assert len(printed) == 200
    got = read(str(tmp_path))
    assert sorted(r["request_id"] for r in got) == sorted(printed)  # every row once
    assert {r["replica"] for r in got} == {"a", "b"}


def test_every_row_acknowledged_before_a_sigkill_is_in_the_table(tmp_path):
    proc = writer(tmp_path, "k", 0)
    acknowledged: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            acknowledged.append(line.strip())
            if len(acknowledged) >= 60:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    acknowledged += rest.split()  # printed before the kill, read after it
    assert proc.returncode == -signal.SIGKILL and len(acknowledged) >= 60
    assert set(acknowledged) <= set(ids(tmp_path))


def test_compact_keeps_the_rows_in_fewer_files(tmp_path):
    dest = str(tmp_path)
    with AuditLog(dest, max_delay_s=0) as audit:
        for i in range(8):
            audit.record_sync(row(f"r{i}"))
        assert audit.groups == 8
    before = read(dest)
    report = compact(dest)
    assert report == {"files_added": 1, "files_removed": 8}
    assert read(dest) == before
    assert len(open_log(location(dest)).file_uris()) == 1


def test_vacuum_deletes_the_rows_older_than_the_retention_and_their_files(tmp_path):
    dest, now = str(tmp_path), datetime(2025, 6, 30, 12, 0, tzinfo=UTC)
    ages = {"old-100d": 100, "old-91d": 91, "cut-day-before": 90.25, "cut-day-after": 89.75, "new-1d": 1}
    with AuditLog(dest, max_delay_s=0) as audit:
        for rid, days in ages.items():
            audit.record_sync(row(rid, when=now - timedelta(days=days)))
    table_dir = Path(table_uri(location(dest)))
    assert (table_dir / "day=2025-03-22").is_dir()  # 100 days before
    report = vacuum(dest, timedelta(days=90), now=now)
    assert report["rows_deleted"] == 3 and report["files_deleted"] >= 3
    assert ids(dest) == ["cut-day-after", "new-1d"]
    assert not list((table_dir / "day=2025-03-22").glob("*.parquet"))  # the data itself is gone, not just unlisted
    assert vacuum(dest, timedelta(days=90), now=now)["rows_deleted"] == 0
    with pytest.raises(InvalidInput, match="older_than"):
        vacuum(dest, timedelta(0))


def test_read_filters(tmp_path):
    dest, now = str(tmp_path), datetime.now(UTC)
    with AuditLog(dest, max_delay_s=0) as audit:
        audit.record_sync(row("old", when=now - timedelta(hours=3), actions=("block",)))
        audit.record_sync(row("kids", tenant="kids", actions=("allow", "blur")))
        audit.record_sync(row("acme", actions=("allow",)))
    assert [r["request_id"] for r in read(dest, since=now - timedelta(hours=1))] == ["kids", "acme"]
    assert [r["request_id"] for r in read(dest, tenant="acme")] == ["old", "acme"]
    assert [r["request_id"] for r in read(dest, action="blur")] == ["kids"]
    assert [r["request_id"] for r in read(dest, action="block", tenant="acme")] == ["old"]
    assert read(dest, action="flag") == []
    with pytest.raises(InvalidInput, match="no audit log at"):
        read(str(tmp_path / "elsewhere"))


def test_durations_and_times():
    assert parse_duration("90d") == timedelta(days=90) and parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("30m") == timedelta(minutes=30) and parse_duration("1.5h") == timedelta(minutes=90)
    now = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_since("1h", now) == datetime(2025, 1, 31, 11, 0, tzinfo=UTC)
    assert parse_since("2025-01-30") == datetime(2025, 1, 30, tzinfo=UTC)
    assert parse_since("2025-01-30T10:00:00+02:00") == datetime(2025, 1, 30, 8, tzinfo=UTC)
    for bad in ("90", "0d", "3 days", "-1h"):
        with pytest.raises(InvalidInput, match="expected a positive number and a unit"):
            parse_duration(bad)
    with pytest.raises(InvalidInput, match="--since 'yesterday': expected an ISO 8601 time"):
        parse_since("yesterday")


def test_the_audit_command(tmp_path, capsys):
    dest, now = str(tmp_path), datetime.now(UTC)
    with AuditLog(dest, max_delay_s=0) as audit:
        audit.record_sync(row("old", when=now - timedelta(days=100), actions=("block",)))
        audit.record_sync(row("kids", tenant="kids", actions=("blur",), route="generate"))
        audit.record_sync(row("acme", actions=("allow",)))
    capsys.readouterr()

    assert main(["audit", dest, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in lines] == ["old", "kids", "acme"]
    assert {k: lines[1][k] for k in ("tenant", "route", "status")} == {
        "tenant": "kids",
        "route": "generate",
        "status": 200,
    }
    assert datetime.fromisoformat(lines[1]["time"]).tzinfo is not None

    assert main(["audit", dest, "--since", "1h", "--tenant", "acme", "--json"]) == 0
    assert [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()] == ["acme"]
    assert main(["audit", dest, "--action", "block"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["time", "(UTC)", "route"] and len(table) == 2 and table[1].endswith(" old")

    assert main(["audit", dest, "--vacuum"]) == 2
    assert "--vacuum needs --older-than" in capsys.readouterr().err
    assert main(["audit", dest, "--compact", "--tenant", "kids"]) == 2
    assert "--tenant" in capsys.readouterr().err
    assert main(["audit", dest, "--vacuum", "--older-than", "90d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_deleted"] == 1
    assert main(["audit", dest, "--compact"]) == 0
    assert capsys.readouterr().out.startswith("compacted: ")
    assert main(["audit", dest, "--json"]) == 0
    assert [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()] == ["kids", "acme"]

    assert main(["audit", str(tmp_path / "none")]) == 2
    assert f"no audit log at {tmp_path / 'none'}" in capsys.readouterr().err
    assert main(["audit", dest, "--since", "yesterday"]) == 2


def test_the_audit_log_imports_without_ray():
    code = "import sys, pipeline.audit, pipeline.cli.audit; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
