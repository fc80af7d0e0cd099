"""Review decisions as labels for ``evaluate`` and ``calibrate`` (``--labels DEST``).

``confirm`` -> the category the object was flagged for (its top flagged category when decided), ``overturn`` -> safe,
``relabel`` -> its category. Only decisions in force for the object's current etag count (stale ones are left out,
as is a confirmed unscorable object, which has no category). The images are read from where the objects are now (the
SOURCE, or the quarantine copy) and embedded once, like a labelled folder's.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..decisions import current_decisions
from ..errors import DiffguardError, InvalidInput
from ..evaluate import SAFE, LabelledSet, canonical, labelled_set
from ..scan.state import read_current
from ..storage import Version, locate, parse_location, sha256

log = logging.getLogger(__name__)
READERS = 8  # concurrent object reads


def decision_labels(dest: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """One entry per object with a decision in force: its scan row's fields, ``label`` and ``url`` (where it is now)."""
    location = parse_location(dest, endpoint_url, "--labels")
    current = read_current(location)
    decisions = current_decisions(location, current, endpoint_url)
    if not decisions:
        return []
    out = []
    for row in current.filter(_keys_mask(current, decisions)).to_pylist():
        decision = decisions[row["key"]]
        label = decision.label()
        if label is None:
            log.info("%s: confirmed with no category (unscorable): not a label", row["key"])
            continue
        store, key = locate(row, endpoint_url)
        out.append({**row, "label": canonical(label), "url": store.url(key), "decision": decision.decision})
    return out


def _keys_mask(current: Any, decisions: dict[str, Any]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(current["key"], value_set=pa.array(sorted(decisions), pa.string()))


def load_decision_labels(dest: str, checker: Any, endpoint_url: str | None = None) -> LabelledSet:
    """The decided objects under ``dest`` as a :class:`~pipeline.evaluate.LabelledSet` (paths are object URLs)."""
    entries = decision_labels(dest, endpoint_url)
    if not entries:
        raise InvalidInput(f"--labels {dest}: no review decisions in force there (decide some with `diffguard review`)")

    def read(entry: dict[str, Any]) -> bytes | DiffguardError:
        store, key = locate(entry, endpoint_url)
        try:  # the bytes the decision was made on, nothing else: a label never lands on other pixels
            data, _ = store.read(key, None if entry.get("quarantined_to") else Version.of(entry))
        except DiffguardError as exc:
            return exc
        if entry.get("sha256") and sha256(data) != entry["sha256"]:
            return InvalidInput(f"{entry['url']} changed since it was reviewed (its sha256 is not the one reviewed)")
        return data

    with ThreadPoolExecutor(READERS) as pool:
        blobs = list(pool.map(read, entries))
    paths, labels, objects, skipped = [], [], [], []
    items = [b if isinstance(b, bytes) else b"" for b in blobs]
    for entry, blob, viewed in zip(entries, blobs, checker.views(items), strict=True):
        problem = blob if isinstance(blob, DiffguardError) else viewed if isinstance(viewed, Exception) else None
        if problem is not None:
            skipped.append({"path": entry["url"], "error": str(problem)})
            continue
        paths.append(entry["url"])
        labels.append(entry["label"])
        objects.append(viewed)
    if not objects:
        raise InvalidInput(f"--labels {dest}: none of the {len(entries)} decided objects could be read: {skipped[:3]}")
    return labelled_set(checker, paths, labels, objects, skipped)


def merge(*sets: LabelledSet) -> LabelledSet:
    """One labelled set from several (a folder and review decisions), scored with the same detectors."""
    columns = sets[0].detector_columns
    if any(s.detector_columns != columns or (s.detector is None) != (sets[0].detector is None) for s in sets):
        raise InvalidInput("labelled sets scored with different detectors cannot be merged")
    owners, offset = [], 0
    for s in sets:
        owners.append((s.owners if s.owners is not None else torch.arange(len(s.labels))) + offset)
        offset += len(s.labels)
    return LabelledSet(
        [p for s in sets for p in s.paths],
        [lab for s in sets for lab in s.labels],
        torch.cat([s.embeds for s in sets]),
        [x for s in sets for x in s.skipped],
        torch.cat(owners),
        torch.cat([s.detector for s in sets]) if sets[0].detector is not None else None,  # type: ignore[misc]
        columns,
    )


__all__ = ["SAFE", "decision_labels", "load_decision_labels", "merge"]
