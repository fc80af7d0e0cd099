"""``diffguard check``: score image files and folders with the safety checker.

Exit codes: 0 every input checked; 1 with ``--fail-on-nsfw`` when the stock decision (``nsfw``) is set for some
image; 2 usage errors (bad arguments, a model that cannot be loaded); 3 some inputs could not be read or scored (their
rows are still printed, with the policy's ``unscorable_action``; 3 wins over 1). The table and its summary use the
words of docs/CLI.md: scored, unscorable, flagged, withheld (flagged + unscorable withheld), reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..images import IMAGE_SUFFIXES, SNIFF_BYTES
from ..media import media_format
from ..policy import image_action, withheld
from .options import EXIT_FLAGGED, EXIT_OK, EXIT_UNREADABLE, add_checker_options, load_checker

CHUNK = 64  # inputs read and scored together, bounding memory on large folders
WIDTH = 100  # table width when stdout is not a terminal (and COLUMNS is unset): piped output stays the same
HITS_MIN, HITS_MAX = 20, 60  # the hits column's width, whatever the terminal's

log = logging.getLogger("diffguard")


def register(sub: Any) -> None:
    check = sub.add_parser("check", help="score images with the safety checker")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or directories (recursed)")
    add_checker_options(check)
    check.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    check.add_argument("--fail-on-nsfw", action="store_true", help="exit 1 when nsfw (the stock decision) is set")
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
    tally = Tally()
    hits_width = _hits_width(table_width(), max(len(str(p)) for p in inputs))
    if not args.json:
        print(table_header(hits_width))
    for start in range(0, len(inputs), CHUNK):
        chunk = inputs[start : start + CHUNK]
        for path, verdict in zip(chunk, checker.check(chunk), strict=True):
            tally.add(verdict)
            row = {"path": str(path), **verdict.to_dict(), "fingerprint": checker.fingerprint}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(table_row(row, hits_width), flush=True)
    if not args.json:
        parts = checker.parts
        tag = f" (tiny demo weights, meaningless: {', '.join(parts['demo'])}" if parts["demo"] else ""
        tag += f"; real: {', '.join(parts['real'])})" if tag and parts["real"] else (")" if tag else "")
        print(f"\n{tally.summary(checker.concepts.unscorable_action)}\nfingerprint {checker.fingerprint}{tag}")
    if tally.unscorable:
        return EXIT_UNREADABLE
    return EXIT_FLAGGED if args.fail_on_nsfw and tally.nsfw else EXIT_OK


class Tally:
    """The summary's counts, in the words of docs/CLI.md (Words): withheld = flagged + withheld unscorable.

    >>> tally = Tally()
    >>> tally.add(Verdict(action="block"))
    >>> tally.summary("block")
    '1 checked: 1 scored, 0 unscorable (block); 1 withheld (1 flagged, 0 unscorable), 0 reported'
    """

    def __init__(self) -> None:
        self.checked = self.unscorable = self.flagged = self.withheld_unscorable = self.reported = self.nsfw = 0

    def add(self, verdict: Any) -> None:
        self.checked += 1
        self.nsfw += verdict.nsfw
        held = withheld(verdict)
        if verdict.error is not None:  # read but not scored: the policy's unscorable_action
            self.unscorable += 1
            self.withheld_unscorable += held
        else:
            self.flagged += held
        self.reported += image_action(verdict) == "flag"

    def summary(self, unscorable_action: str) -> str:
        scored = self.checked - self.unscorable
        held = self.flagged + self.withheld_unscorable
        return (
            f"{self.checked} checked: {scored} scored, {self.unscorable} unscorable ({unscorable_action}); "
            f"{held} withheld ({self.flagged} flagged, {self.withheld_unscorable} unscorable), {self.reported} reported"
        )


def table_width() -> int:
    """The terminal's columns when stdout is one (or COLUMNS says), else :data:`WIDTH`."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return shutil.get_terminal_size((WIDTH, 24)).columns
    return WIDTH


def _hits_width(width: int, path_width: int) -> int:
    """The hits column: what the table's fixed columns and the longest path leave of ``width``, within bounds."""
    return max(HITS_MIN, min(HITS_MAX, width - len(_fixed("", "")) - 1 - path_width))


def _fixed(action: str, top: str) -> str:
    return f"{action:<8} {top:>9}  "


def _cell(text: str, width: int) -> str:
    """``text`` in ``width`` characters: padded, or cut with an ellipsis."""
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "\u2026"


def table_header(hits_width: int) -> str:
    return f"{_fixed('action', 'top score')}{_cell('categories; concepts hit', hits_width)} path"


def table_row(row: dict, hits_width: int) -> str:
    """One input's row: the flagged categories first (the meaningful part), then the concepts hit; an unscorable
    input reads ``UNSCORABLE: <why>`` in the same column, with the policy's unscorable_action."""
    if row["error"]:
        why = _cell(f"UNSCORABLE: {' '.join(row['error'].split())}", hits_width)  # one line, whatever the error
        return f"{_fixed(row['action'] or 'block', '-')}{why} {row['path']}"
    top = max(row["concept_scores"], default=0.0)
    hits = "; ".join(filter(None, (",".join(row["flagged_categories"]), ",".join(row["bad_concept_names"]))))
    hits = (f"(truncated) {hits}".rstrip() if row.get("truncated") else hits) or "-"
    action = row["action"] or ("NSFW" if row["nsfw"] else "ok")
    return f"{_fixed(action, f'{top:.3f}')}{_cell(hits, hits_width)} {row['path']}"
