"""``diffguard check``: score image files and folders with the safety checker.

Exit codes: 0 every input checked; 1 with ``--fail-on-nsfw`` when something was flagged; 2 usage errors (bad
arguments, a model that cannot be loaded); 3 some inputs could not be read or scored (their rows are still printed,
with the policy's ``unscorable_action``; 3 wins over 1).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..images import IMAGE_SUFFIXES, SNIFF_BYTES
from ..media import media_format
from .options import EXIT_FLAGGED, EXIT_OK, EXIT_UNREADABLE, add_checker_options, load_checker

CHUNK = 64  # inputs read and scored together, bounding memory on large folders

log = logging.getLogger("diffguard")


def register(sub: Any) -> None:
    check = sub.add_parser("check", help="score images with the safety checker")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or directories (recursed)")
    add_checker_options(check)
    check.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    check.add_argument("--fail-on-nsfw", action="store_true", help="exit 1 when any image is flagged")
    check.set_defaults(run=cmd_check)


def _is_image(path: Path) -> bool:
    """Named like an image or video (then an undecodable one is reported and withheld), or one by its first bytes
    whatever its name: what :func:`pipeline.views.media_format` says of the first ``SNIFF_BYTES`` (one small read)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return media_format(f.read(SNIFF_BYTES)) is not None
    except OSError:
        return True  # unreadable: keep it, so that it is reported (and withheld) rather than silently skipped


def iter_inputs(paths: list[Path]) -> Iterator[Path]:
    """Files as given; directories recursed in sorted order, keeping images by name or by content (as the scan does)."""
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if _is_image(p)]
            kept = set(images)
            skipped = [p for p in files if p not in kept]
            if skipped:
                log.info("%s: skipping %d files that are not images (e.g. %s)", path, len(skipped), skipped[0].name)
            yield from images
        else:
            yield path


def cmd_check(args: argparse.Namespace) -> int:
    checker = load_checker(args)
    inputs = list(iter_inputs(args.paths))
    if not inputs:
        raise UsageError(f"no image files found under {', '.join(map(str, args.paths))}")
    flagged = unscorable = 0
    if not args.json:
        print(f"{'action':<8} {'top score':>9}  {'concepts and categories hit':<28} path")
    for start in range(0, len(inputs), CHUNK):
        chunk = inputs[start : start + CHUNK]
        for path, verdict in zip(chunk, checker.check(chunk), strict=True):
            flagged += verdict.nsfw
            unscorable += verdict.error is not None
            row = {"path": str(path), **verdict.to_dict(), "fingerprint": checker.fingerprint, "demo": checker.demo}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(_table_row(row), flush=True)
    if not args.json:
        tag = " (tiny demo weights: meaningless)" if checker.demo else ""
        action = checker.concepts.unscorable_action
        summary = f"{len(inputs)} checked, {flagged} flagged, {unscorable} unscorable ({action})"
        print(f"\n{summary}; fingerprint {checker.fingerprint}{tag}")
    if unscorable:
        return EXIT_UNREADABLE
    return EXIT_FLAGGED if args.fail_on_nsfw and flagged else EXIT_OK


def _table_row(row: dict) -> str:
    if row["error"]:  # unscorable: the policy's unscorable_action, and why
        return f"{row['action'] or 'block':<8} {'-':>9}  {'UNSCORABLE: ' + row['error'][:60]:<28} {row['path']}"
    top = max(row["concept_scores"], default=0.0)
    hits = ",".join(row["bad_concept_names"] + row["flagged_categories"]) or "-"
    hits = f"(truncated) {hits}" if row.get("truncated") else hits
    return f"{row['action'] or ('NSFW' if row['nsfw'] else 'ok'):<8} {top:>9.3f}  {hits[:28]:<28} {row['path']}"
