"""The review core without a server: decision validation, the journal's latest-wins and stale rules, the queue's score
and cursor, and which rows a scan's action takes once reviewers have decided."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from pipeline.decisions import NOTE_MAX, PREFIX, Decision, DecisionLog, current_decisions, validate
from pipeline.errors import InvalidInput
from pipeline.review.queue import _list_max, decode_cursor, encode_cursor
from pipeline.scan.actions import eligible
from pipeline.storage import parse_location

pytestmark = pytest.mark.unit
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def digest(name: str) -> str:
    """A sha256-shaped stand-in for the bytes a decision was made on."""
    return hashlib.sha256(name.encode()).hexdigest()


def decision(key: str, etag: str, what: str, minutes: int, category: str | None = None) -> Decision:
    """A decision on the bytes named ``etag`` (their sha256 is ``digest(etag)``)."""
    when = T0 + timedelta(minutes=minutes)
    return Decision(key, etag, "fp", what, category, None, "ana", when, sha256=digest(etag))


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("maybe", None, None), "decision"),
        (("relabel", None, None), "category"),
        (("relabel", "gore", None), "category"),
        (("confirm", "hate", None), "category"),
        (("overturn", None, "x" * (NOTE_MAX + 1)), "note"),
    ],
)
def test_validation_names_the_field_the_value_and_what_is_allowed(args, field):
    with pytest.raises(InvalidInput) as err:
        validate(*args, frozenset({"hate", "violence"}))
    assert err.value.message.startswith(f"{field}: got") and "allowed" in err.value.message


def test_valid_decisions_pass():
    validate("relabel", "hate", "a note", frozenset({"hate"}))
    validate("overturn", None, "x" * NOTE_MAX, frozenset())


def test_latest_per_key_and_bytes_wins_across_files_and_survives_reopening(tmp_path):
    dest = parse_location(str(tmp_path))
    log = DecisionLog(dest)
    log.append([decision("a.png", "e1", "confirm", 2, "hate")])
    log.append([decision("a.png", "e1", "overturn", 1)])  # decided earlier: does not win
    log.append([decision("a.png", "e2", "relabel", 3, "violence"), decision("b/c.png", "e9", "overturn", 4)])
    for reopened in (log, DecisionLog(dest)):
        assert reopened.get("a.png", digest("e1")).decision == "confirm"
        assert reopened.get("a.png", digest("e2")).decision == "relabel" and reopened.for_key("a.png").etag == "e2"
        assert reopened.latest()[("a.png", f"sha256:{digest('e1')}")].decision == "confirm"
        assert len(reopened.all()) == 4
    assert len(list((tmp_path / PREFIX).iterdir())) == 3  # one file per append, never rewritten
    (tmp_path / PREFIX / ".diffguard-tmp-half").write_bytes(b"PAR1 half a file")  # a write killed mid-way
    assert len(DecisionLog(dest).all()) == 4  # never read


def test_current_decisions_leave_out_stale_ones(tmp_path):
    dest = parse_location(str(tmp_path))
    DecisionLog(dest).append([decision("a", "old", "overturn", 1), decision("b", "e", "confirm", 1, "hate")])
    current = pa.table({"key": ["a", "b"], "etag": ["new", "e"], "sha256": [digest("new"), digest("e")]})
    assert {k: d.decision for k, d in current_decisions(dest, current).items()} == {"b": "confirm"}
    assert decision("a", "old", "overturn", 1).label() == "safe"
    assert decision("b", "e", "confirm", 1, "hate").label() == "hate"


def test_scores_take_the_highest_category_else_concept_margin():
    maps = pa.chunked_array([pa.array([[("x", 0.1), ("y", 0.3)], [], None], pa.map_(pa.string(), pa.float64()))])
    lists = pa.chunked_array([pa.array([[0.2, None, 0.5], [], None], pa.list_(pa.float64()))])
    np.testing.assert_array_equal(_list_max(maps), [0.3, np.nan, np.nan])
    np.testing.assert_array_equal(_list_max(lists), [0.5, np.nan, np.nan])


@pytest.mark.parametrize(("score", "key"), [(0.25, "a/b c%.png"), (float("inf"), "x"), (-1e-9, "")])
def test_cursor_round_trips_and_garbage_is_a_422(score, key):
    assert decode_cursor(encode_cursor(score, key)) == (score, key)
    with pytest.raises(InvalidInput, match="cursor"):
        decode_cursor("!!not base64 json")


def test_scan_actions_skip_overturned_and_take_confirmed_objects():
    current = pa.table(
        {
            "key": ["flagged", "overturned", "reported-confirmed", "reported", "relabelled", "read-error"],
            "etag": ["e"] * 6,
            "flagged": [True, True, False, False, False, False],
            "error": [None] * 5 + ["timeout"],
            "quarantined_to": pa.nulls(6, pa.string()),
            "tagged": [False] * 6,
        }
    )
    listed = dict.fromkeys(current["key"].to_pylist(), "e")
    decisions = {"overturned": "overturn", "reported-confirmed": "confirm", "relabelled": "relabel"}
    keys = current["key"].to_pylist()
    assert [keys[i] for i in eligible(current, listed, "quarantine")] == ["flagged", "overturned"]
    chosen = [keys[i] for i in eligible(current, listed, "tag", decisions)]
    assert chosen == ["flagged", "reported-confirmed", "relabelled"]
