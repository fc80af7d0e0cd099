"""The reliability report's splice: a section regenerated alone replaces its own row, section and note, and keeps the
notes of sections regenerated alone earlier."""

from __future__ import annotations

import pytest

from tests.reliability.render import render
from tests.reliability.report import SPLICED, scenario, splice

pytestmark = pytest.mark.unit
META = {"generated": "2026-12-05T00:00:00+00:00", "command": "make reliability", "machine": "m", "seconds": 1}


def _scenario(title: str, ok: bool = True) -> dict:
    return scenario(title, "injected", {"case_count": 1}, {"holds": ok})


def test_a_splice_replaces_its_section_and_keeps_earlier_notes():
    report = render(META, [_scenario("A"), _scenario("B")])
    once = splice(report, {**META, "command": "--only a"}, [_scenario("A", ok=False)])
    twice = splice(once, {**META, "command": "--only b"}, [_scenario("B")])
    notes = [line for line in twice.splitlines() if line.startswith(SPLICED)]
    assert len(notes) == 2 and "“A”" in notes[1] and "“B”" in notes[0]
    assert twice.count("## A\n") == 1 and "FAILED" in twice
    again = splice(twice, {**META, "command": "--only a"}, [_scenario("A")])
    notes = [line for line in again.splitlines() if line.startswith(SPLICED)]
    assert len(notes) == 2 and "FAILED" not in again  # A's old note replaced, B's kept
