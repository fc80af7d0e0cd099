"""The bucket scan: score every image under s3://bucket/prefix (or a directory), results as Parquet under DEST.

``plan`` (what to read, no Ray; stores are :mod:`pipeline.storage`), ``state`` (DEST's layout and current view),
``shards`` and ``commit`` (the plan and the commit cut by a hash of the key), ``actions`` (quarantine and tags),
``job`` (the driver, its Ray tasks and the Ray Data job) and ``progress`` (the metrics' holder actor): the only modules
here that use Ray.
Names are imported lazily, so ``import pipeline.scan`` imports neither Ray nor torch.

>>> from pipeline.scan import ScanConfig, read_current, run_scan
>>> summary = run_scan(ScanConfig("s3://bucket/images", "s3://bucket/results"))
>>> read_current("s3://bucket/results").num_rows
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ScanConfig": "plan",
    "ScanSummary": "plan",
    "read_current": "state",
    "run_scan": "job",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline.scan' has no attribute {name!r}")
