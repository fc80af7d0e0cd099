"""``diffguard review`` (the review app over a scan's results) and ``diffguard decisions`` (export the decisions)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import positive_int


def register(sub: Any) -> None:
    from ..review.server import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser(
        "review", help="a local web app to review a scan's withheld and reported objects and record decisions"
    )
    p.add_argument("dest", metavar="DEST", help="the --output of a scan: s3://bucket/prefix or a local directory")
    p.add_argument(
        "--host", default=DEFAULT_HOST, help="bind address (default 127.0.0.1; others need DIFFGUARD_API_KEY or --keys)"
    )
    p.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)")
    p.add_argument(
        "--reviewer", help="the name recorded on the key's decisions (default $DIFFGUARD_REVIEWER or the user)"
    )
    p.add_argument(
        "--keys",
        metavar="FILE",
        help="keys file: each reviewer's key by its SHA-256, decisions recorded under that reviewer "
        "(default $DIFFGUARD_KEYS_FILE; not with DIFFGUARD_API_KEY)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name the app answers to besides loopback and --host (a proxy's name); repeatable",
    )
    p.set_defaults(run=cmd_review)

    d = sub.add_parser("decisions", help="export the review decisions recorded under a scan's DEST")
    d.add_argument("dest", metavar="DEST")
    d.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)")
    d.add_argument("--all", action="store_true", help="every decision ever made, not only the latest per key and bytes")
    d.add_argument("--json", action="store_true", help="one JSON object per decision (default: a table)")
    d.set_defaults(run=cmd_decisions)


def cmd_review(args: argparse.Namespace) -> int:
    from ..review.server import serve
    from .scan import endpoint

    serve(args.dest, args.host, args.port, endpoint(args), args.reviewer, args.keys, args.allowed_host)
    return 0


def cmd_decisions(args: argparse.Namespace) -> int:
    from ..decisions import DecisionLog
    from ..scan.state import read_current
    from ..storage import parse_location
    from .scan import endpoint

    dest = parse_location(args.dest, endpoint(args), "DEST")
    log = DecisionLog(dest)
    decisions = log.all() if args.all else list(log.latest().values())
    current = read_current(dest)
    scored = {k: (h, e) for k, h, e in zip(*(current[c].to_pylist() for c in ("key", "sha256", "etag")), strict=True)}
    for d in decisions:
        stale = log.get(d.key, *scored.get(d.key, (None, None))) != d  # not in force for the bytes scored now
        if args.json:
            print(json.dumps({**d.to_json(), "stale": stale, "label": d.label()}))
        else:
            mark = " (stale)" if stale else ""
            when = f"{d.decided_at:%Y-%m-%d %H:%M:%S}"
            print(f"{when}  {d.decision:<8} {d.category or '-':<12} {d.reviewer:<12} {d.key}{mark}")
    return 0
