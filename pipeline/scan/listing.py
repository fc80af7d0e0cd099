"""Listing a large S3 source in parallel: an exact partition of its key space by prefix, found with delimiter listings.

:func:`partition` descends the key tree under SOURCE one level at a time (``Delimiter="/"`` listings, several at once
in threads) until it holds enough prefixes for the listing tasks, or the tree ends. Every key under SOURCE then lies
in exactly one place: it is an object directly at a level that was expanded (listed there, by the driver), or it lies
under exactly one of the prefixes left, each listed whole by one task (:func:`list_prefixes`). So no key is listed
twice, even while objects are added or removed during the listing (those may or may not appear, like with one
paginator). Prefixes inside DEST or the quarantine are never listed. The tasks themselves run in
:func:`pipeline.scan.job.fanout_listing` (this module imports no Ray).

A source with few objects is listed by one paginator (:func:`small_listing`): a page or two, no Ray started.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import ObjectInfo, S3Store, StorageError
from .plan import LISTING_SCHEMA, excluded, listing_table

FANOUT_MIN = 1000  # with a Ray cluster up: SOURCEs of at most this many objects (one LIST page) get one paginator
# Without one, the fan-out first pays Ray's start (4-14 s measured on 2 cores), which S3 answers ~10^5 keys in
# sequentially (100 LIST calls at 50-100 ms): below that, one paginator is faster.
LOCAL_FANOUT_MIN = 100_000
PREFIXES_PER_TASK = 4  # the partition aims at this many prefixes per listing task running at once (load balance)
MAX_DEPTH = 16  # levels below SOURCE that the partition descends at most (a prefix this deep is listed whole)


@dataclass(frozen=True)
class Partition:
    """SOURCE's key space, split: the objects found directly at the expanded levels, and the prefixes (sorted) that
    each get listed whole, by one task."""

    objects: list[ObjectInfo]
    prefixes: list[str]

    def groups(self, n: int, exclude: list[str]) -> list[list[str]]:
        """The prefixes in about ``n`` contiguous groups of nearly equal count (one task each), split where an
        excluded prefix lies between two of them (a task lists its group as one key range: never through DEST)."""
        if not self.prefixes:
            return []  # the tree ended: the partition listed everything itself
        n = max(1, min(n, len(self.prefixes)))
        size, extra = divmod(len(self.prefixes), n)
        bounds = list(itertools.accumulate([0] + [size + (i < extra) for i in range(n)]))
        groups = []
        for a, b in itertools.pairwise(bounds):
            group = [self.prefixes[a]]
            for p in self.prefixes[a + 1 : b]:
                if any(group[-1] < e < p for e in exclude):
                    groups.append(group)
                    group = []
                group.append(p)
            groups.append(group)
        return groups


def _inside(prefix: str, exclude: list[str]) -> bool:
    return any(prefix.startswith(e) for e in exclude)


def small_listing(store: S3Store, prefix: str, limit: int, versions: bool) -> list[ObjectInfo] | None:
    """Every object under ``prefix`` when there are at most ``limit`` of them (one paginator); None when more."""
    head = list(itertools.islice(store.list(prefix, versions), limit + 1))
    return head if len(head) <= limit else None


def partition(store: S3Store, prefix: str, target: int, exclude: list[str], threads: int, versions: bool) -> Partition:
    """Expand prefixes breadth-first (``threads`` delimiter listings at once) until at least ``target`` prefixes are
    left to list, or none can be expanded. Sub-prefixes inside ``exclude`` (DEST, the quarantine) are dropped."""
    objects: list[ObjectInfo] = []
    frontier: deque[tuple[str, int]] = deque([(prefix, 0)])
    whole: list[str] = []  # too deep to expand further: listed whole
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while frontier and len(frontier) + len(whole) < target:
            batch = [frontier.popleft() for _ in range(min(threads, len(frontier)))]
            whole += [p for p, depth in batch if depth >= MAX_DEPTH]
            batch = [(p, depth) for p, depth in batch if depth < MAX_DEPTH]
            for (_, depth), (found, subs) in zip(
                batch, pool.map(lambda item: store.list_level(item[0], versions), batch), strict=True
            ):
                objects += found
                frontier.extend((s, depth + 1) for s in subs if not _inside(s, exclude))
    return Partition(objects, sorted(whole + [p for p, _ in frontier]))


def list_prefixes(store: S3Store, prefixes: list[str], exclude: list[str], versions: bool) -> pa.Table:
    """Every object under each of ``prefixes`` (sorted, none inside another), outside ``exclude``: one listing task.

    One paginator over the key range from the first prefix to the end of the last (not one per prefix: a group may
    hold thousands of small prefixes); keys in the range under none of them (objects at an expanded level, which the
    partition listed) are passed over. A versioned bucket is listed one prefix at a time."""
    return without(listing_table(_in_range(store, prefixes, versions)), exclude)


def _in_range(store: S3Store, prefixes: list[str], versions: bool) -> Iterator[ObjectInfo]:
    if versions:  # one paginator per prefix: stores differ on a KeyMarker that is not a listed key (moto 5.2 drops
        for prefix in prefixes:  # the first version after it), while StartAfter means the same everywhere
            yield from store.list(prefix, versions)
        return
    common = os.path.commonprefix(prefixes)
    start = prefixes[0][:-1] if common != prefixes[0] else None  # every key under prefixes[0] sorts after it
    i = 0
    for obj in store.list(common, versions, start_after=start):
        # past prefixes[i] entirely: the key sorts after it and does not start with it
        while i < len(prefixes) and obj.key > prefixes[i] and not obj.key.startswith(prefixes[i]):
            i += 1
        if i == len(prefixes):
            return  # past the last prefix: the rest of the range is another task's
        if obj.key.startswith(prefixes[i]):
            yield obj


def without(objects: pa.Table, exclude: list[str]) -> pa.Table:
    """The listing without the objects under ``exclude`` (DEST, the quarantine)."""
    if exclude and objects.num_rows:
        return objects.filter(pc.invert(excluded(objects["key"], exclude)))
    return objects


def combine(tables: list[pa.Table]) -> pa.Table:
    """The tasks' listings as one table sorted by key. A key listed twice means the partition was not exact: the
    listing fails rather than scan or act on an object twice."""
    objects = pa.concat_tables([t.cast(LISTING_SCHEMA) for t in tables]) if tables else LISTING_SCHEMA.empty_table()
    objects = objects.sort_by("key")
    distinct = pc.count_distinct(objects["key"]).as_py() if objects.num_rows else 0
    if distinct != objects.num_rows:
        raise StorageError(f"the parallel listing returned {objects.num_rows - distinct} keys twice; not scanning")
    return objects
