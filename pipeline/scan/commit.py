"""A run's shards gathered and committed: which pieces each shard task reads, and the one Delta commit of a run.

:func:`current_inputs` says where each shard's current view comes from (its table file when the table is cut into
these shards, else slices of every table file; slices of the staged parts), :func:`scatter_listing` cuts the listing,
and :func:`commit_run` commits the files the shard tasks wrote, then the manifest, then deletes the staged parts.
:func:`compact` does all of it in this process (tests, benchmarks, small DESTs).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from ..storage import Location
from .shards import FinishSpec, TableFile, finish_shard, read_split, shard_count, sharded_files, split_pieces
from .state import FORMAT, ROW_SCHEMA, Meta, _delete_folded, _write_manifest, load_meta
from .table import TABLE, commit_files

PARTS_PER_TASK = 32  # staged parts read and split by one task


class Runner:
    """Runs the shard functions in this process; :class:`pipeline.scan.job.RayRunner` runs them as Ray tasks."""

    remote = False

    def call(self, fn: Any, *args: Any, num_returns: int = 1, retry: bool = True) -> Any:
        """``fn(*args)``; ``num_returns``: how many values it returns; ``retry``: whether a task that died may be run
        again (only for functions without side effects outside DEST's uncommitted files)."""
        return fn(*args)

    def get(self, value: Any) -> Any:
        return value

    def put(self, value: Any) -> Any:
        return value


@dataclass
class Inputs:
    """Where each shard's current view comes from: table pieces and staged-part pieces, per shard."""

    shards: int
    rewrite: bool  # the table is not cut into ``shards`` (or there is none): every shard is rewritten
    table: list[list[Any]]
    staged: list[list[Any]]


def current_inputs(runner: Runner, dest: Location, meta: Meta, shards: int, columns: list[str] | None) -> Inputs:
    """Each shard's pieces of the current view: its table file when the table is cut into ``shards`` (read by the
    shard's own task), else slices of every table file; slices of the staged parts (read and split by tasks)."""
    cut = sharded_files(meta.files)
    table: list[list[Any]] = [[] for _ in range(shards)]
    rewrite = meta.table_version is None or cut is None or cut[0] != shards
    if not rewrite:
        for s, path in cut[1].items():  # type: ignore[index]
            table[s].append(TableFile(dest, f"{TABLE}/{path}"))
    else:
        _scatter(runner, dest, [f"{TABLE}/{p}" for p, _ in meta.files], 1, shards, columns, table)
    staged: list[list[Any]] = [[] for _ in range(shards)]
    _scatter(runner, dest, meta.parts, PARTS_PER_TASK, shards, columns, staged)
    return Inputs(shards, rewrite, table, staged)


def _scatter(runner: Runner, dest: Location, rels: list[str], per_task: int, shards: int, columns, out) -> None:  # noqa: ANN001
    for i in range(0, len(rels), per_task):
        pieces = runner.call(read_split, dest, rels[i : i + per_task], shards, columns, num_returns=shards)
        for s, piece in enumerate([pieces] if shards == 1 else pieces):
            out[s].append(piece)


def scatter_listing(runner: Runner, pieces: list[Any], shards: int, per_task: int = 1) -> list[list[Any]]:
    """Each shard's pieces of the listing: ``per_task`` listing pieces split by one task (so the driver holds
    ``len(pieces) / per_task * shards`` references)."""
    out: list[list[Any]] = [[] for _ in range(shards)]
    if shards == 1:
        return [list(pieces)]
    for i in range(0, len(pieces), per_task):
        for s, piece in enumerate(runner.call(split_pieces, shards, *pieces[i : i + per_task], num_returns=shards)):
            out[s].append(piece)
    return out


def commit_run(
    dest: Location,
    run: int,
    source: str,
    meta: Meta,
    inputs: Inputs,
    results: dict[int, dict[str, Any]],
    summary: dict[str, Any],
    run_id: str | None = None,
) -> dict[str, Any]:
    """Commit the finished shards' files as run ``run`` (one Delta commit), then the manifest, then delete the
    staged parts folded in. ``results``: shard -> :func:`finish_shard`'s answer (shards not finished keep their
    file). ``run_id``: the run's unique id (:mod:`pipeline.scan.lock`), recorded in the commit. Returns the
    manifest."""
    cut = sharded_files(meta.files)
    old = cut[1] if cut is not None and not inputs.rewrite else {}
    adds = [r["add"] for r in results.values() if r["add"] is not None]
    removes = [old[s] for s, r in results.items() if r["replaced"] and s in old]
    version = commit_files(dest, adds, removes, run, ROW_SCHEMA, overwrite=inputs.rewrite, run_id=run_id)
    kept = {path: rows for path, rows in meta.files}
    rows = sum(r["rows"] for r in results.values()) + sum(
        kept[old[s]] for s in old if s not in results or not results[s]["replaced"]
    )
    manifest = {
        "format": FORMAT,
        "source": source,
        "table": TABLE,
        "version": version,
        "snapshot_run": run,
        "rows": rows,
        "shards": inputs.shards,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "last_run": summary,
    }
    _write_manifest(dest, manifest)
    _delete_folded(dest, run)
    return manifest


def compact(dest: Location, run: int, source: str, keep: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Fold everything committed so far into one Delta version of the objects in ``keep`` plus quarantined ones,
    in this process (a scan does the same shard by shard, in tasks). Returns the manifest.

    Order makes it crash-safe: the Delta commit (recording ``run``) is the atomic step, then the manifest that names
    its version, and only then are the parts it folded in deleted; until the commit lands, readers use the previous
    version and the parts, and after it they ignore parts of ``run`` and older.
    """
    if isinstance(keep, pa.ChunkedArray):
        keep = keep.combine_chunks() if keep.num_chunks else pa.array([], pa.string())
    elif not isinstance(keep, pa.Array):
        keep = pa.array(sorted(keep), pa.string())
    meta = load_meta(dest)
    rows = sum(max(n, 0) for _, n in meta.files)
    shards = shard_count(max(rows, len(keep)), (sharded_files(meta.files) or (1, {}))[0])
    runner = Runner()
    inputs = current_inputs(runner, dest, meta, shards, None)
    listing = pa.table({"key": keep, "etag": pa.nulls(len(keep), pa.string())})
    listed = scatter_listing(runner, [listing], shards)
    spec = FinishSpec(dest, run, shards, inputs.rewrite, dest, None, None, False, None)
    results = {
        s: finish_shard(spec, s, len(listed[s]), len(inputs.table[s]), *listed[s], *inputs.table[s], *inputs.staged[s])
        for s in range(shards)
    }
    return commit_run(dest, run, source, meta, inputs, results, summary)
