"""The ``diffguard`` command line: check images, generate, serve, scan buckets, evaluate policies, manage weights.

Each command family lives in its own module and registers its subparsers here; only ``serve`` and ``scan`` load Ray,
and only when they run. Exit codes are each command's (``pipeline.cli.options``); errors the user can fix exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import raylogs
from ..errors import DiffguardError
from . import audit, check, evaluate, generate, models, review, scan, serve
from .options import EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffguard", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging on stderr, and Ray's own logs as Ray prints them"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in (check, models, generate, serve, evaluate, scan, review, audit):  # cheap imports only
        family.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    raylogs.set_verbose(args.verbose)  # default: Ray's noise quieted (pipeline.raylogs), never a real problem
    try:
        return args.run(args)
    except DiffguardError as exc:
        print(f"diffguard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
