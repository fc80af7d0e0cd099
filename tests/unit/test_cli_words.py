"""The words of every summary (docs/CLI.md, Words) and the `check` table's columns at a given width."""

from __future__ import annotations

import sys

import pytest

from pipeline.cli.check import WIDTH, Tally, _hits_width, table_header, table_row, table_width
from pipeline.cli.scan import summary_table
from pipeline.scan.plan import ScanSummary
from pipeline.verdict import Verdict


def scored(action: str, categories=(), concepts=(), truncated=False) -> Verdict:
    nsfw = bool(concepts)
    return Verdict(
        nsfw=nsfw,
        concept_scores=[0.25 if nsfw else -0.5, -0.75],
        bad_concept_names=list(concepts),
        flagged_categories=list(categories),
        action=action,
        truncated=truncated,
    )


ROWS = {
    "photos/allowed.png": scored("allow"),
    "photos/reported.png": scored("flag", ["harassment"]),
    "photos/a-much-longer-name.jpg": scored("block", ["sexual", "special_care"], ["concept_1", "concept_4"]),
    "cut.jpg": scored("blur", ["violence"], ["concept_2"], truncated=True),
    "broken.png": Verdict.failed("corrupt or truncated image (image file is truncated)", "block"),
}


def render(width: int) -> list[str]:
    hits = _hits_width(width, max(map(len, ROWS)))
    rows = [table_row({"path": p, **v.to_dict()}, hits) for p, v in ROWS.items()]
    return [table_header(hits), *rows]


def test_check_table_at_80_columns_keeps_its_columns():
    lines = render(80)
    assert all(len(line) <= 80 for line in lines), lines
    starts = {line.rindex(" " + path) for line, path in zip(lines, ["path", *ROWS], strict=True)}
    assert len(starts) == 1, f"the path column moves: {lines}"  # every row aligned, the unscorable one too
    by_path = dict(zip(ROWS, lines[1:], strict=True))
    column = starts.pop()
    cells = {path: line[20:column] for path, line in by_path.items()}  # the hits column: 80 - 20 - 1 - 29 = 30 wide
    assert cells["photos/a-much-longer-name.jpg"] == "sexual,special_care; concept_\u2026"  # categories first
    assert cells["broken.png"] == "UNSCORABLE: corrupt or trunca\u2026" and by_path["broken.png"].startswith("block  ")
    assert cells["cut.jpg"] == "(truncated) violence; concept\u2026"
    assert cells["photos/reported.png"].rstrip() == "harassment" and cells["photos/allowed.png"].rstrip() == "-"
    assert lines[0].split() == ["action", "top", "score", "categories;", "concepts", "hit", "path"]


def test_check_table_width_bounds_and_default(monkeypatch):
    assert _hits_width(200, 10) == 60 and _hits_width(80, 200) == 20  # within bounds, whatever the terminal
    wide = render(200)
    assert "UNSCORABLE: corrupt or truncated image (image file is" in wide[-1]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    assert table_width() == WIDTH == 100  # piped: the same output on every machine
    monkeypatch.setenv("COLUMNS", "80")
    assert table_width() == 80


@pytest.mark.parametrize(
    ("unscorable_action", "expected"),
    [
        ("block", "5 checked: 4 scored, 1 unscorable (block); 3 withheld (2 flagged, 1 unscorable), 1 reported"),
        ("allow", "5 checked: 4 scored, 1 unscorable (allow); 2 withheld (2 flagged, 0 unscorable), 1 reported"),
    ],
)
def test_check_summary_words(unscorable_action, expected):
    tally = Tally()
    for verdict in ROWS.values():
        if verdict.error:
            verdict = Verdict.failed(verdict.error, unscorable_action)
        tally.add(verdict)
    assert tally.summary(unscorable_action) == expected
    assert (tally.unscorable, tally.nsfw) == (1, 2)  # --fail-on-nsfw still follows the stock decision


def test_scan_summary_words():
    s = ScanSummary("src", "dest", 3, "abc", False, listed=9, scanned=7, skipped_non_image=1, skipped_symlinks=1)
    s.flagged, s.reported, s.errors, s.unscorable = 4, 1, 3, 2  # 2 scored and withheld + 2 unscorable; 1 read error
    lines = [" ".join(line.split()) for line in summary_table(s).splitlines()]
    assert "scanned in this run 7 (images read: scored, unscorable or read errors)" in lines
    assert "scored 4" in lines
    assert "unscorable 2 (the policy's unscorable_action: block)" in lines
    assert "read errors 1 (retried next run, never acted on)" in lines
    assert 'withheld 4 (2 flagged + 2 unscorable; JSON "flagged")' in lines
    assert "reported (flag) 1 (released as they are, reported)" in lines
    assert "skipped: not images 1" in lines
    assert s.as_json()["flagged"] == s.withheld == 4  # the JSON's names and meanings are unchanged
    s.unscorable_action = "allow"
    assert 'withheld 4 (4 flagged + 0 unscorable; JSON "flagged")' in " ".join(summary_table(s).split())
