"""``python -m tests.stalling_scan N SCAN-ARGS...``: ``diffguard scan SCAN-ARGS`` whose scoring workers stall once N
parts are committed under DEST, so that a test's SIGKILL lands mid-run (the hook lives here, not in the product: the
driver's reference to the write stage is replaced, and Ray ships the replacement to the workers). With
``STALL_UNTIL=PATH`` in the environment the workers stall only until PATH exists, and the scan then completes."""

from __future__ import annotations

import os
import sys
import time

from pipeline.cli import main
from pipeline.scan import job


def stall_after(n: int, until: str | None = None) -> None:
    write_part = job.write_part

    def write_then_stall(batch, parts):  # noqa: ANN001, ANN202 - runs in a Ray worker
        counts = write_part(batch, parts)
        dest = parts.dest
        if sum(info.key.endswith(".parquet") for info in dest.store.list(dest.key("parts/"))) >= n:
            print(f"stalling after {n} parts so that the test can kill this run", file=sys.stderr, flush=True)
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline and not (until and os.path.exists(until)):
                time.sleep(0.2)
        return counts

    job.write_part = write_then_stall


if __name__ == "__main__":
    stall_after(int(sys.argv[1]), os.environ.get("STALL_UNTIL"))
    sys.exit(main(["scan", *sys.argv[2:]]))
