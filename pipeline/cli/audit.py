"""``diffguard audit``: print the HTTP service's audit log (filtered), compact it, or apply retention."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit", help="print the service's audit log under DEST (audit_dest), compact it or apply retention"
    )
    p.add_argument("dest", metavar="DEST", help="the service's audit_dest: s3://bucket/prefix or a local directory")
    p.add_argument(
        "--since", metavar="T", help="rows from T on: ISO 8601 (UTC unless it names a zone) or a duration ago"
    )
    p.add_argument("--tenant", metavar="T", help="only this tenant's rows")
    p.add_argument("--action", metavar="A", help="only rows with an image whose action is A (allow, flag, blur, block)")
    p.add_argument("--json", action="store_true", help="one JSON object per row (default: a table)")
    p.add_argument("--compact", action="store_true", help="rewrite each day's small files into few large ones")
    p.add_argument("--vacuum", action="store_true", help="delete rows older than --older-than, then their files")
    p.add_argument("--older-than", metavar="D", help="with --vacuum: the retention, a duration (90d, 12h, 30m)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)")
    p.set_defaults(run=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from ..audit import compact, parse_duration, parse_since, read, vacuum
    from .scan import endpoint

    if args.compact and args.vacuum:
        raise UsageError("--compact and --vacuum: allowed: one of them at a time")
    if args.vacuum and not args.older_than:
        raise UsageError("--vacuum needs --older-than (the retention: 90d, 12h, 30m); nothing was deleted")
    if args.older_than and not args.vacuum:
        raise UsageError(f"--older-than {args.older_than} is only for --vacuum")
    maintenance = "--compact" if args.compact else "--vacuum" if args.vacuum else None
    filters = [f for f in ("since", "tenant", "action") if getattr(args, f) is not None]
    if maintenance and filters:
        raise UsageError(f"--{filters[0]} filters the rows printed; not with {maintenance}")

    if args.compact:
        report = compact(args.dest, endpoint_url=endpoint(args))
        print(
            json.dumps(report)
            if args.json
            else f"compacted: {report['files_removed']} files into {report['files_added']}"
        )
        return 0
    if args.vacuum:
        report = vacuum(args.dest, parse_duration(args.older_than, "--older-than"), endpoint_url=endpoint(args))
        print(
            json.dumps(report)
            if args.json
            else f"retention {args.older_than}: {report['rows_deleted']} rows deleted, {report['files_deleted']} files"
        )
        return 0

    since = parse_since(args.since) if args.since is not None else None
    rows = read(args.dest, since, args.tenant, args.action, endpoint_url=endpoint(args))
    if args.json:
        for row in rows:
            print(json.dumps({**row, "time": row["time"].isoformat()}))
        return 0
    print(f"{'time (UTC)':<23} {'route':<8} {'status':>6} {'ms':>8} {'tenant':<12} {'actions':<18} request_id")
    for row in rows:
        actions = ",".join(image["action"] for image in row["images"]) or "-"
        latency = f"{row['latency_ms']:.1f}" if row["latency_ms"] is not None else "-"
        print(
            f"{row['time']:%Y-%m-%d %H:%M:%S.%f}"[:23]
            + f" {row['route']:<8} {row['status']:>6} {latency:>8} {row['tenant'] or '-':<12} {actions:<18}"
            + f" {row['request_id']}"
        )
    return 0
