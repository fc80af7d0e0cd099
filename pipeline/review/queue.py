"""The review queue: the scan's current view, filtered to what a reviewer looks at, sorted once, paged by cursor.

The queue holds the objects whose action is not ``allow``: withheld (blur, black, block), reported (flag) and unscorable
ones, highest score first (an object's score is its highest category score, else its highest stock concept margin;
unscorable objects, which have none, come first), then by key. It is built once when the app starts, with pyarrow
compute over the current table: a page is a binary search for the cursor plus at most ``limit`` matching rows, so its
cost does not grow with the scan's size. A cursor encodes the last (score, key) shown.
"""

from __future__ import annotations

import base64
import bisect
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..decisions import DECISIONS, Decision, DecisionLog
from ..errors import InvalidInput

STATES = ("all", "undecided", "stale", *DECISIONS)  # a decision for the current etag, none, or only older ones
PAGE_MAX = 200
DETAIL = ("key", "etag", "size", "last_modified", "action", "flagged", "nsfw", "categories", "flagged_categories")
DETAIL += ("bad_concept_names", "error", "error_kind", "unscorable", "truncated", "quarantined_to", "tagged")
DETAIL += ("model_fingerprint", "scanned_at", "bucket", "version_id", "sha256")
DETAIL += ("views", "views_total", "views_sampled", "view", "detector_scores", "real", "demo")


def _entries(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A map column as a list of (key, value) structs, which the list kernels take."""
    entry = pa.struct([("key", column.type.key_type), ("value", column.type.item_type)])
    return column.cast(pa.list_(entry))


def _list_max(column: pa.ChunkedArray) -> np.ndarray:
    """Per row, the largest value of a list (or map: its values) column; NaN for a null or empty one. (N,) float64."""
    if pa.types.is_map(column.type):
        column = _entries(column)
    values = pc.list_flatten(column)
    if pa.types.is_struct(values.type):
        values = pc.struct_field(values, 1)  # (key, value) entries -> values
    parents = np.asarray(pc.list_parent_indices(column).to_numpy(zero_copy_only=False), dtype=np.int64)
    out = np.full(len(column), np.nan)
    np.fmax.at(out, parents, np.asarray(pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False), np.float64))
    return out


def scores(table: pa.Table) -> np.ndarray:
    """The queue's sort score per row: highest category score, else highest concept margin; +inf when unscorable."""
    score = _list_max(table["categories"])
    concept = _list_max(table["concept_scores"])
    score = np.where(np.isnan(score), concept, score)
    return np.where(np.isnan(score), np.inf, score)


def encode_cursor(score: float, key: str) -> str:
    raw = json.dumps([None if math.isinf(score) else score, key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        score, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(key, str) or not (score is None or isinstance(score, (int, float))):
            raise ValueError
    except (ValueError, TypeError):
        raise InvalidInput(f"cursor: got {cursor[:80]!r}; allowed: a next_cursor returned by GET /api/items") from None
    return (math.inf if score is None else float(score)), key


@dataclass
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None
    total: int  # objects in the queue (all filters off)


class ReviewQueue:
    """The queue over one scan's current view (``table``, e.g. from ``read_current``) and its decisions.

    >>> queue = ReviewQueue(read_current(dest), DecisionLog.open(dest))
    >>> page = queue.page(state="undecided", category="violence", limit=50)
    >>> queue.page(cursor=page.next_cursor)  # the next 50
    """

    def __init__(self, table: pa.Table, decisions: DecisionLog):
        action = table["action"]
        wanted = pc.fill_null(pc.and_(pc.is_valid(action), pc.not_equal(action, "allow")), False)
        queued = table.filter(wanted)
        score = scores(queued)
        order = np.lexsort((np.asarray(queued["key"].to_pylist(), dtype=object), -score))
        self.table = queued.take(pa.array(order, pa.int64()))  # sorted: score desc, then key
        self.score = score[order]
        self.keys: list[str] = self.table["key"].to_pylist()
        self.etags: list[str] = self.table["etag"].to_pylist()
        self.digests: list[str | None] = self.table["sha256"].to_pylist()  # of the bytes scored
        self._sort = list(zip((-self.score).tolist(), self.keys, strict=True))  # ascending; bisect target
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.actions = np.asarray(pc.fill_null(self.table["action"], "").to_numpy(zero_copy_only=False), dtype=object)
        flat = pc.list_flatten(self.table["flagged_categories"])
        parents = np.asarray(pc.list_parent_indices(self.table["flagged_categories"]).to_numpy(zero_copy_only=False))
        self._by_category: dict[str, np.ndarray] = {}
        for cat in pc.unique(flat).to_pylist() if len(flat) else []:
            hit = np.asarray(pc.equal(flat, cat).to_numpy(zero_copy_only=False), dtype=bool)
            self._by_category[cat] = np.zeros(len(self.keys), dtype=bool)
            self._by_category[cat][parents[hit]] = True
        # the categories a relabel may name: every category the scan's policy scored
        cats = (
            pc.struct_field(pc.list_flatten(_entries(table["categories"])), 0)
            if table.num_rows
            else pa.array([], pa.string())
        )
        self.categories = frozenset(pc.unique(cats).to_pylist()) - {None}
        self.decisions = decisions

    # -- state of one row ------------------------------------------------------------------------------------------
    def state(self, i: int) -> tuple[str, Decision | None]:
        """("undecided" | "stale" | confirm | overturn | relabel, the latest decision on the key)."""
        decision = self.decisions.for_key(self.keys[i])
        if decision is None:
            return "undecided", None
        current = self.decisions.get(self.keys[i], self.digests[i], self.etags[i])  # in force for the bytes scored
        if current is not None:
            return current.decision, current
        return "stale", decision

    def _matches(self, i: int, state: str, category: str | None, action: str | None) -> bool:
        if category is not None and not (category in self._by_category and self._by_category[category][i]):
            return False
        if action is not None and self.actions[i] != action:
            return False
        return state == "all" or self.state(i)[0] == state

    def _candidates(self, start: int, state: str) -> Iterator[int]:
        """Row positions from ``start`` on; for a decided state only the decided keys (few), in queue order."""
        if state in DECISIONS or state == "stale":
            decided = sorted(p for k in self.decisions.decided_keys() if (p := self.position.get(k)) is not None)
            yield from decided[bisect.bisect_left(decided, start) :]
        else:
            yield from range(start, len(self.keys))

    def page(
        self,
        state: str = "all",
        category: str | None = None,
        action: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        if state not in STATES:
            raise InvalidInput(f"state: got {state!r}; allowed: {', '.join(STATES)}")
        if not 1 <= limit <= PAGE_MAX:
            raise InvalidInput(f"limit: got {limit}; allowed: 1 to {PAGE_MAX}")
        start = 0
        if cursor:
            score, key = decode_cursor(cursor)
            start = bisect.bisect_right(self._sort, (-score, key))
        found: list[int] = []
        more = False
        for i in self._candidates(start, state):
            if self._matches(i, state, category, action):
                if len(found) == limit:
                    more = True
                    break
                found.append(i)
        items = self.items(found)
        last = found[-1] if found else None
        next_cursor = encode_cursor(float(self.score[last]), self.keys[last]) if more and last is not None else None
        return Page(items, next_cursor, len(self.keys))

    def items(self, positions: list[int]) -> list[dict[str, Any]]:
        rows = self.table.select([c for c in DETAIL if c in self.table.column_names])
        rows = rows.take(pa.array(positions, pa.int64())).to_pylist()
        out = []
        for i, row in zip(positions, rows, strict=True):
            state, decision = self.state(i)
            row["categories"] = dict(row["categories"] or [])
            if row.get("detector_scores") is not None:  # Arrow maps read as (key, value) pairs
                row["detector_scores"] = {name: dict(outputs or []) for name, outputs in row["detector_scores"]}
            row["score"] = None if math.isinf(self.score[i]) else float(self.score[i])
            for field in ("last_modified", "scanned_at"):
                row[field] = row[field].isoformat() if row.get(field) is not None else None
            row["state"] = state
            row["decision"] = decision.to_json() if decision is not None else None
            out.append(row)
        return out

    def get(self, key: str) -> dict[str, Any] | None:
        i = self.position.get(key)
        return None if i is None else self.items([i])[0]
