"""``python -m tests.stalling_scan N SCAN-ARGS...``: ``diffguard scan SCAN-ARGS`` that stalls after its Nth committed
Parquet part, so that a test's SIGKILL lands mid-run (the hook lives here, not in the product)."""

from __future__ import annotations

import sys
import time

from pipeline.cli import main
from pipeline.scan.state import PartWriter


def stall_after(parts: int) -> None:
    commit = PartWriter.commit

    def commit_then_stall(self: PartWriter, table):  # noqa: ANN001
        result = commit(self, table)
        if self.parts >= parts:
            print(f"stalling after part {self.parts} so that the test can kill this run", file=sys.stderr, flush=True)
            time.sleep(3600)
        return result

    PartWriter.commit = commit_then_stall  # type: ignore[method-assign]


if __name__ == "__main__":
    stall_after(int(sys.argv[1]))
    sys.exit(main(["scan", *sys.argv[2:]]))
