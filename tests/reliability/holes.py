"""The holes an outside review found (issue 25), each replayed as the attack it reproduced and its outcome recorded.

Every case is one test that drives the attack against the real thing (moto over HTTP, the review app and the Serve
app over real sockets, Chromium for the framed click) and asserts that it is refused; the scenario runs them with
pytest and reports each one's outcome and time. The same tests run in CI.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

BYTES = "tests/integration/test_review_bytes.py::"
UNIT = "tests/unit/test_bound_to_bytes.py::"
REVIEW = "tests/integration/test_review_edge.py::"
LOCK = "tests/integration/test_scan_lock.py::"
EDGE_UNIT = "tests/unit/test_edge.py::"
EDGE = "tests/integration/test_edge_served.py::"

# (the hole, what must happen now, the test that replays it)
CASES: list[tuple[str, str, str]] = [
    (
        "review of one version, exemption of another: U → S → U in an unversioned bucket",
        "S never shown nor decided on as the scanned object (409); an overturn of S is not U's; U quarantined",
        BYTES + "test_a_swap_between_scan_review_and_apply_leaves_the_scanned_bytes_withheld[unversioned]",
    ),
    (
        "the same swap in a versioned bucket",
        "the same: 409, U quarantined",
        BYTES + "test_a_swap_between_scan_review_and_apply_leaves_the_scanned_bytes_withheld[versioned]",
    ),
    (
        "a decision on bytes other than the row's (same key and etag)",
        "not in force; the same bytes uploaded again stay decided",
        UNIT + "test_a_decision_is_in_force_only_for_the_bytes_it_was_made_on",
    ),
    (
        "`--release` race: a write lands right after the verification read",
        "the row names the bytes verified, so the later write is rescored; the overturn never reaches it",
        UNIT + "test_release_binds_the_row_to_the_bytes_it_verified_not_a_write_after_them",
    ),
    (
        "a forged `_release` entry naming a file outside the quarantine",
        "refused, reported, kept; nothing deleted",
        UNIT + "test_a_forged_release_entry_never_deletes_a_file_outside_the_quarantine",
    ),
    (
        "a forged `_quarantine` entry naming an unflagged source object",
        "refused, reported, kept; nothing deleted",
        UNIT + "test_a_forged_quarantine_entry_never_deletes_an_unflagged_source_object",
    ),
    (
        "a row whose `quarantined_to` lies outside the quarantine, overturned",
        "not released, nothing deleted",
        UNIT + "test_release_refuses_a_row_whose_copy_is_outside_the_quarantine",
    ),
    (
        "a malformed decision file under DEST",
        "skipped with a warning naming it; the app and every scan go on",
        UNIT + "test_a_malformed_decisions_file_or_row_is_skipped_with_a_warning_never_fatal",
    ),
    (
        "a future-dated `decided_at`",
        "not believed (it would win forever)",
        UNIT + "test_a_future_dated_decision_is_not_believed",
    ),
    (
        "two scans on one DEST at once",
        "the second exits 2 naming the holder and since when; the first completes; nothing lost",
        LOCK + "test_second_scan_on_a_busy_dest_exits_2_and_the_first_completes",
    ),
    (
        "a failed Delta commit at the same run number by another writer",
        "not taken as ours: the run id must match too",
        "tests/unit/test_scan_lock.py::test_a_failed_commit_is_ours_only_with_our_run_id",
    ),
    (
        "the review app on loopback asked with a foreign Host (DNS rebinding)",
        "refused; loopback names and the configured host answered",
        REVIEW + "test_a_foreign_host_is_refused_loopback_names_are_not",
    ),
    (
        "a cross-site POST of a decision to the review app",
        "403, nothing stored",
        REVIEW + "test_a_cross_site_post_is_refused_and_nothing_stored",
    ),
    (
        "a click in an invisible frame of the review page on another loopback origin",
        "the frame is refused (frame-ancestors 'none'); nothing stored",
        REVIEW + "test_a_framed_click_is_blocked_in_chromium",
    ),
    (
        "a 60 MB keyless POST to the review app",
        "401 before the body is read; the app's memory flat",
        REVIEW + "test_a_60_mb_keyless_post_is_refused_before_its_body_is_read",
    ),
    (
        "another local user (or a rebinding page) posts to the keyless loopback app",
        "401 without the per-start token printed in the start-up URL",
        REVIEW + "test_loopback_needs_the_printed_token",
    ),
    (
        "every reviewer recorded as the server's `--reviewer`",
        "each decision names the reviewer of the key that made it",
        REVIEW + "test_a_keys_file_names_the_reviewer_of_each_key",
    ),
    (
        "`/v1/generate` with no Content-Type (a `no-cors` fetch from another site)",
        "415",
        EDGE + "test_generate_needs_application_json",
    ),
    (
        "cross-site browser requests to a keyless service",
        "403 naming the header; curl and the same-origin page still served",
        EDGE + "test_the_keyless_service_refuses_cross_site_browser_requests",
    ),
    (
        "duplicate Content-Type, Content-Length or Authorization headers",
        "400 before anything reads them",
        EDGE_UNIT + "test_duplicate_headers_are_refused_before_anything_reads_them",
    ),
    (
        "a multipart Content-Type with `xboundary=` and no boundary",
        "not taken as the boundary: parsed as Starlette parses it",
        EDGE_UNIT + "test_a_parameter_ending_in_boundary_is_not_the_boundary",
    ),
    (
        "10 of 100 declared bytes, then a stall",
        "408 after `body_read_timeout_s`",
        EDGE + "test_a_stalled_body_gets_408",
    ),
    (
        "two uploads named `a.png` on the page, one blocked",
        "each card shows its own file's pixels (matched by index)",
        EDGE + "test_two_uploads_of_one_name_each_show_their_own_pixels[False]",
    ),
]


def run(cases: list[tuple[str, str, str]] = CASES) -> dict[str, Any]:
    """Run the cases' tests in one pytest process; each case's outcome and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", f"--junitxml={report}"]
        proc = subprocess.run([*cmd, *(t for *_, t in cases)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
        found = {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                path = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
                failed = any(child.tag in ("failure", "error") for child in case)
                skipped = any(child.tag == "skipped" for child in case)
                found[path] = ("failed" if failed else "skipped" if skipped else "passed", float(case.get("time", 0)))
    cells, measured, outcomes = {}, {}, {}
    for hole, expected, test in cases:
        runs = [v for k, v in found.items() if k == test or k.startswith(test + "[")]  # every parameter of it
        outcome = "not run" if not runs else next((o for o, _ in runs if o != "passed"), "passed")
        seconds = sum(t for _, t in runs)
        outcomes[hole] = outcome
        cells[hole] = {"now": expected, "replayed by": f"`{test.split('::')[-1]}`"}
        measured[hole] = f"{outcome} ({seconds:.1f} s)"
    return {
        "case_count": len(cases),
        "outcomes": f"{sum(o == 'passed' for o in outcomes.values())} refused as expected",
        "table": {"paths": ["now", "replayed by"], "cells": cells, "measured": measured},
        "pytest_exit_code": proc.returncode,
        "stderr_tail": proc.stdout[-3000:] if proc.returncode else "",
        "passed": outcomes,
    }


def holes_scenario() -> dict[str, Any]:
    from .report import scenario

    f = run()
    return scenario(
        "Holes closed (issue 25: decisions bound to bytes, DEST within bounds, the edges)",
        "each attack an outside review reproduced, replayed against the real parts by its test",
        {k: v for k, v in f.items() if k != "passed"},
        {"every attack refused (its test passed)": all(o == "passed" for o in f["passed"].values())},
    )
