"""The audit log on an S3 API over HTTP (moto's server): group commits, two writers, read back, retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from pipeline.audit import AuditLog, read, vacuum
from tests.integration.scan_support import all_keys, new_bucket
from tests.unit.test_audit import row


def test_the_audit_log_on_s3(s3, s3_endpoint):
    bucket = new_bucket(s3)
    dest, now = f"s3://{bucket}/audit-dest", datetime.now(UTC)

    async def burst(audit: AuditLog, prefix: str) -> None:
        await asyncio.gather(*(audit.record(row(f"{prefix}{i:02d}")) for i in range(30)))

    async def both(a: AuditLog, b: AuditLog) -> None:
        await asyncio.gather(burst(a, "a"), burst(b, "b"))

    with AuditLog(dest, endpoint_url=s3_endpoint, replica="one") as a, AuditLog(dest, endpoint_url=s3_endpoint) as b:
        a.record_sync(row("old", when=now - timedelta(days=100)))
        asyncio.run(both(a, b))
        assert a.rows + b.rows == 61 and a.groups + b.groups < 61
    got = read(dest, endpoint_url=s3_endpoint)
    assert len(got) == 61 and got[0]["request_id"] == "old"
    assert any(k.startswith("audit-dest/audit/_delta_log/") for k in all_keys(s3, bucket))
    assert vacuum(dest, timedelta(days=90), endpoint_url=s3_endpoint)["rows_deleted"] == 1
    assert len(read(dest, endpoint_url=s3_endpoint)) == 60
    assert len(read(dest, since=now - timedelta(days=1), tenant="acme", endpoint_url=s3_endpoint)) == 60
