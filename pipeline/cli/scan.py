"""``diffguard scan`` (score a bucket or a directory with Ray Data) and ``diffguard scan-results`` (the current view).

Exit codes of ``scan``: 0 the job completed (bad objects are rows, counted in the summary); 1 the job failed (no access
to a bucket, a storage or Ray failure: rerunning resumes); 2 usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from ..errors import DiffguardError, StorageError, UsageError
from .options import add_checker_options, checker_spec, float_in, positive_int

log = logging.getLogger("diffguard")

EXIT_FAILED = 1


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {value}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser("scan", help="score every image under s3://bucket/prefix or a directory; Parquet results")
    p.add_argument("source", metavar="SOURCE", help="s3://bucket/prefix or a local directory")
    p.add_argument("--output", required=True, metavar="DEST", help="results: s3://bucket/prefix or a local directory")
    add_checker_options(p)
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2); default $AWS_ENDPOINT_URL or AWS")
    p.add_argument("--full", action="store_true", help="rescore every object, not only new or changed ones")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--quarantine", metavar="PREFIX", help="move withheld objects under PREFIX (with --apply)")
    action.add_argument("--tag", action="store_true", help="tag withheld objects moderation=nsfw (with --apply)")
    p.add_argument("--apply", action="store_true", help="perform the action (default: dry run)")
    p.add_argument(
        "--release",
        action="store_true",
        help="move objects a reviewer overturned back out of quarantine and remove the tag set (with --apply)",
    )
    p.add_argument("--num-gpus", type=_non_negative_float, default=0.0, help="GPUs per scoring actor (default 0)")
    p.add_argument("--max-actors", type=positive_int, help="scoring actors (default: GPUs/--num-gpus, or CPUs/2)")
    p.add_argument(
        "--threads", type=positive_int, help="torch threads per CPU scoring actor (default: the CPUs / the actors)"
    )
    p.add_argument(
        "--inventory",
        metavar="MANIFEST",
        help="list SOURCE from an S3 Inventory report (its manifest.json: s3://... or a local path) instead of LIST",
    )
    p.add_argument(
        "--list-parallelism",
        type=positive_int,
        metavar="N",
        help="S3 listing tasks at once, over prefixes (default: automatic, 2 per CPU; 1: one sequential paginator)",
    )
    p.add_argument("--part-rows", type=positive_int, default=500, help="rows per committed Parquet part (500)")
    p.add_argument(
        "--shard-rows",
        type=positive_int,
        default=1_000_000,
        metavar="N",
        help="objects per shard, what one plan or finish task holds (1000000; a power-of-two number of shards)",
    )
    p.add_argument(
        "--break-lock",
        action="store_true",
        help="take DEST's lock from the scan holding it: only when that scan is dead (one scan per DEST at a time)",
    )
    p.add_argument(
        "--lock-wait-s",
        type=float_in(0, 86400),
        default=0.0,
        metavar="S",
        help="on a busy DEST, try again for up to S seconds before exiting 2: a retried job whose scan died with its "
        "cluster gets the lock once it goes stale (10 min without a heartbeat), then resumes (default 0)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="start this scan's own Ray with its Prometheus metrics (ray_diffguard_scan_*) on PORT, for a local "
        "Prometheus; refused when the scan joins a cluster (RAY_ADDRESS), whose nodes export them on their own port",
    )
    p.add_argument("--json", action="store_true", help="one JSON summary object on stdout")
    p.set_defaults(run=cmd_scan)

    r = sub.add_parser("scan-results", help="print the current view of scan results: one JSON object per object")
    r.add_argument("dest", metavar="DEST", help="the --output of a scan")
    r.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)")
    r.add_argument("--flagged", action="store_true", help="only withheld objects (flagged or unscorable)")
    r.add_argument("--non-images", action="store_true", help="also the objects recorded as not images")
    r.set_defaults(run=cmd_scan_results)


def endpoint(args: argparse.Namespace) -> str | None:
    return args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@contextlib.contextmanager
def stdout_reserved() -> Iterator[None]:
    """Send everything written to stdout meanwhile (Ray, workers, libraries, child processes) to stderr."""
    sys.stdout.flush()
    saved_fd, saved_stdout = os.dup(1), sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        sys.stdout = saved_stdout


def cmd_scan(args: argparse.Namespace) -> int:
    from ..scan import ScanConfig, run_scan

    if args.apply and not (args.quarantine or args.tag or args.release):
        raise UsageError("--apply needs an action: --quarantine PREFIX, --tag or --release")
    cfg = ScanConfig(
        source=args.source,
        output=args.output,
        checker=checker_spec(args),
        endpoint_url=endpoint(args),
        full=args.full,
        quarantine=args.quarantine,
        tag=args.tag,
        apply=args.apply,
        release=args.release,
        batch_size=args.batch_size,
        num_gpus=args.num_gpus,
        max_actors=args.max_actors,
        threads=args.threads,
        part_rows=args.part_rows,
        inventory=args.inventory,
        list_parallelism=args.list_parallelism,
        shard_rows=args.shard_rows,
        break_lock=args.break_lock,
        lock_wait_s=args.lock_wait_s,
        metrics_port=args.metrics_port,
    )
    with stdout_reserved():
        try:
            summary = run_scan(cfg)
        except StorageError as exc:
            log.error("diffguard: error: %s", exc)
            return EXIT_FAILED
        except DiffguardError:
            raise  # bad arguments, a model that cannot be loaded: exit 2 in cli.main
        except Exception as exc:  # noqa: BLE001 - Ray or anything else: the job failed, a rerun resumes
            log.error("diffguard: the scan failed: %s (rerun to resume)", str(exc).splitlines()[0] if str(exc) else exc)
            log.debug("traceback", exc_info=True)
            return EXIT_FAILED
    if args.json:
        print(json.dumps(summary.as_json()), flush=True)
    else:
        print(summary_table(summary), flush=True)
    return 0


def summary_table(s: Any) -> str:
    """The run's counts in the words of docs/CLI.md (Words): withheld = flagged + withheld unscorable."""
    demo = ", tiny demo weights: MEANINGLESS" if s.demo else ""
    held = f'({s.withheld - s.withheld_unscorable:,} flagged + {s.withheld_unscorable:,} unscorable; JSON "flagged")'
    lines = [
        f"scan {s.source} -> {s.output} (run {s.run}, fingerprint {s.fingerprint}{demo})",
        "",
        f"  {'objects listed':<24}{s.listed:>10,}",
        f"  {'scanned in this run':<24}{s.scanned:>10,}  (images read: scored, unscorable or read errors)",
        f"  {'  scored':<24}{s.scored:>10,}",
        f"  {'  unscorable':<24}{s.unscorable:>10,}  (the policy's unscorable_action: {s.unscorable_action})",
        f"  {'  read errors':<24}{s.errors - s.unscorable:>10,}  (retried next run, never acted on)",
        f"  {'  withheld':<24}{s.withheld:>10,}  {held}",
        f"  {'  reported (flag)':<24}{s.reported:>10,}  (released as they are, reported)",
        f"  {'  truncated':<24}{s.truncated:>10,}  (scored on what decodes)",
        f"  {'  views sampled':<24}{s.sampled:>10,}  (more views than --max-views: frames sampled over display time)",
        f"  {'skipped: unchanged':<24}{s.skipped_unchanged:>10,}",
        f"  {'skipped: not images':<24}{s.skipped_non_image:>10,}",
        f"  {'skipped: symlinks':<24}{s.skipped_symlinks:>10,}  (and other non-regular files: never followed)",
    ]
    a = s.actions
    if a.action:
        if a.applied:
            state = f"{a.done:,} done" + (f", {a.failed:,} failed (see the log)" if a.failed else "")
        else:
            state = f"{a.eligible:,} would be done (dry run: add --apply)"
        lines.append(f"  {a.action + ' (withheld)':<24}{state:>10}")
    if s.overturned:
        lines.append(f"  {'overturned (review)':<24}{s.overturned:>10,}  (never acted on)")
    if (r := s.release) is not None:
        state = (
            f"{r.done:,} done" + (f", {r.failed:,} failed" if r.failed else "")
            if r.applied
            else f"{r.eligible:,} would be"
        )
        lines.append(f"  {'release (overturned)':<24}{state:>10}")
    if a.recovered or a.pending:
        lines.append(f"  {'interrupted moves':<24}{a.recovered:>10,} finished, {a.pending} pending --apply")
    if a.refused:
        refusal = "outside SOURCE or the quarantine, or other bytes: nothing deleted (see the log)"
        lines.append(f"  {'refused journal entries':<24}{a.refused:>10,}  {refusal}")
    lines += ["", f"current view: diffguard scan-results {s.output}  (or pipeline.scan.read_current)"]
    return "\n".join(lines)


def cmd_scan_results(args: argparse.Namespace) -> int:
    from ..scan import read_current

    try:
        table = read_current(args.dest, endpoint(args), non_images=args.non_images)
    except StorageError as exc:
        log.error("diffguard: error: %s", exc)
        return EXIT_FAILED
    if args.flagged:
        table = table.filter(table["flagged"])
    for row in table.to_pylist(maps_as_pydicts="strict"):
        print(json.dumps(row, default=str, ensure_ascii=False))
    return 0
