"""``python -m pipeline.review DEST [--host H] [--port P] [--endpoint-url URL] [--reviewer NAME] [--keys FILE]
[--allowed-host NAME]...``: as ``diffguard review``."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import DiffguardError
from .server import DEFAULT_HOST, DEFAULT_PORT, serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.review", description="the review app over a scan's results")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--endpoint-url")
    p.add_argument("--reviewer")
    p.add_argument("--keys", metavar="FILE")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        serve(args.dest, args.host, args.port, args.endpoint_url, args.reviewer, args.keys, args.allowed_host)
    except DiffguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
