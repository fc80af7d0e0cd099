"""The audit log: one row per decision of the HTTP service's ``/v1/generate`` and ``/v1/moderate``, in a Delta Lake
table at ``DEST/audit/`` (``DEST``: ``audit_dest``, a local directory or ``s3://bucket/prefix``), partitioned by
``day``; duckdb, pandas and Spark read it as they read the scan's results.

A row, as a caller passes it to :meth:`AuditLog.record` (exactly these keys; ``None`` where marked nullable):

- ``time``: timezone-aware ``datetime``, when the decision was answered;
- ``request_id``: str; ``key_id``: str | None (the API key's id); ``tenant``: str | None;
- ``route``: ``"generate"`` | ``"moderate"``; ``status``: int, the HTTP status; ``latency_ms``: float | None;
- ``prompt_sha256``: 64 hex digits | None; ``prompt``: str | None (the text, only for tenants that ask);
  ``seed``: int | None; ``params``: JSON text (or a dict) of the generation parameters | None;
- ``images``: list of dicts with exactly ``sha256`` (64 hex | None: of the bytes returned or uploaded, None when
  withheld or none), ``filename`` (str | None), ``nsfw`` (bool), ``flagged`` (list of str), ``categories`` (JSON
  text or dict), ``action`` (str), ``views`` (int), ``error`` (str | None);
- ``policy``: str | None (its name); ``policy_fingerprint``: str | None; ``models``: JSON text (or a dict) | None;
- ``error``: str | None, a refused or failed request's message.

The log adds ``day`` (``YYYY-MM-DD`` of ``time`` in UTC) and ``replica`` (the :class:`AuditLog`'s). The Arrow
schema is :data:`SCHEMA`.

>>> audit = AuditLog("s3://bucket/audit", replica="ingress-1")
>>> await audit.record(row)                               # returns once the row is committed
>>> read("s3://bucket/audit", since=parse_since("1h"), action="block")
>>> vacuum("s3://bucket/audit", parse_duration("90d"))    # retention
"""

from __future__ import annotations

from .log import AuditLog
from .rows import IMAGE_KEYS, ROW_KEYS, SCHEMA, conform, parse_duration, parse_since
from .table import compact, open_log, read, read_table, table_uri, vacuum

__all__ = [
    "IMAGE_KEYS",
    "ROW_KEYS",
    "SCHEMA",
    "AuditLog",
    "compact",
    "conform",
    "open_log",
    "parse_duration",
    "parse_since",
    "read",
    "read_table",
    "table_uri",
    "vacuum",
]
