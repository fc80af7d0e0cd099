"""The bucket scan's Ray Data job over S3 (or a local directory), scoring every image with the core checker.

list (S3 Inventory files read by Ray tasks; a large S3 source by prefix fan-out in Ray tasks,
:mod:`pipeline.scan.listing`; else the driver's paginator or directory walk) -> plan, one Ray task per shard of the
keys (:mod:`pipeline.scan.shards`: the listing's shard joined with the current view's) -> Ray Data: read bytes and
decode + preprocess (CPU tasks, ``map_batches``) -> score (``map_batches`` with :class:`ScoreActor`, an actor pool
holding the core ``SafetyChecker``) -> write parts (``map_batches`` tasks: each commits ``--part-rows`` rows as a
Parquet part under DEST and returns only their counts) -> finish, one Ray task per shard: actions on its flagged
objects, its new slice of the table -> one Delta commit of the files by name (:mod:`pipeline.scan.commit`). Listed
and scored rows stay in the object store and the workers: the driver holds object references and counts. A small
scan (:data:`pipeline.scan.shards.LOCAL_ROWS` objects, no Ray running) plans and finishes in the driver instead,
without starting Ray when nothing is to be read. See :mod:`pipeline.scan.state` for the layout and
:mod:`pipeline.scan.actions` for quarantine/tag. Bad objects are rows with ``error``; only a job-level failure raises.

Every object under SOURCE is a candidate, whatever its name. Objects named like images (``IMAGE_SUFFIXES``) are read
whole as before and decoded; any other object first gets one ranged read of its first ``SNIFF_BYTES`` (a prefix read
locally), identified by the core's :func:`identify`; only images among them are read whole. An object that is not an
image is recorded (a ``not_image`` row, hidden from :func:`read_current`) so it is not read again while unchanged:
at most one small ranged read per object that is not an image, once. What was read but cannot be scored (undecodable,
over ``--max-pixels`` or ``--max-object-bytes``, unsupported) gets the checker's :meth:`unscorable` verdict and is
withheld like a flagged image; read errors stay retryable errors, never acted on.

The run's progress is exported as Prometheus series while it runs (:mod:`pipeline.scan.progress`, whose holder
actor is the scan's one other use of Ray).

long: every Ray stage of the scan (inventory files, read, decode, score) and the driver that runs them live here, the
only module of the scan that imports Ray but for its metrics' holder (:mod:`pipeline.scan.progress`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..decisions import DecisionLog, current_decisions
from ..errors import DiffguardError, InvalidInput
from ..images import SNIFF_BYTES, DecodeLimits
from ..media import media_format
from ..raylogs import filter_stderr, quiet_ray_data
from ..storage import Location, ObjectInfo, S3Store, StorageError, Store, sha256
from ..tiny import demo_banner
from .actions import JOURNAL as QUARANTINE_JOURNAL
from .actions import ActionReport, recover
from .commit import Runner, commit_run, current_inputs, scatter_listing
from .inventory import Inventory, check_source, load_manifest, read_file
from .inventory import listing as inventory_listing
from .listing import (
    FANOUT_MIN,
    LOCAL_FANOUT_MIN,
    PREFIXES_PER_TASK,
    combine,
    list_prefixes,
    partition,
    small_listing,
    without,
)
from .lock import DestLock
from .plan import LISTING_SCHEMA, ScanConfig, ScanSummary, layout, list_source, listing_table
from .progress import ScanProgress
from .release import JOURNAL as RELEASE_JOURNAL
from .release import ReleaseReport, recover_releases, release
from .score import Scorer, decode_stage
from .shards import (
    LOCAL_ROWS,
    PLAN_COLUMNS,
    FinishSpec,
    PlanSpec,
    TableFile,
    current_of,
    finish_shard,
    lookup,
    plan_shard,
    shard_count,
    sharded_files,
)
from .state import NOT_IMAGE, PartWriter, WorkerParts, load_meta, migrate, read_manifest
from .table import TABLE

log = logging.getLogger("diffguard")

DECODE_CPUS = 0.5  # read + decode tasks: I/O-bound reads overlap with decoding
WRITE_CPUS = 0.25  # part-writing tasks: one Parquet encode and one PUT per part_rows rows
PROGRESS_EVERY_S = 30.0  # the driver logs how many objects are committed at most this often
MAX_BLOCKS = 4096  # input blocks for the keys (streaming granularity without per-block overhead on huge buckets)
READ_THREADS = 16  # concurrent GETs per read task
LIST_CPUS = 0.5  # per S3 listing task (waiting on LIST calls, mostly)
SHARD_CPUS = 1  # per plan or finish task (each holds one shard: at most one per CPU)
SPLIT_ROWS = 4_000_000  # listing rows split by one task (fewer tasks: fewer object references in the driver)


READ_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("last_modified_us", pa.int64()),  # microseconds since the epoch, UTC
        ("version_id", pa.string()),
        ("whole", pa.bool_()),
        ("data", pa.large_binary()),
        ("sha256", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)


# --- Ray Data stages (module-level so workers import them; each takes a batch and returns one of the same length) ---
def read_objects(batch: pa.Table, store: Store, max_object_bytes: int) -> pa.Table:
    """Keys -> bytes, sha256 and the etag/size/mtime of exactly the version read; a failed read is that row's error.

    ``whole`` objects (named like images) are read whole unless the listing says they are over ``max_object_bytes``
    (then unscorable, unread). Others are sniffed from their first ``SNIFF_BYTES``: not an image -> a ``not_image``
    row; an image -> read whole (unless the prefix was all of it), or unscorable unread when over the limit.
    """
    listed = batch.to_pylist()

    def oversize(obj: dict[str, Any], size: int) -> dict[str, Any]:
        error = f"object is {size:,} bytes, over the limit of {max_object_bytes:,} (--max-object-bytes); not read"
        return {**obj, "size": size, "data": None, "sha256": None, "error": error, "error_kind": "decode"}

    def got(obj: dict[str, Any], data: bytes, info: ObjectInfo) -> dict[str, Any]:
        version = {"etag": info.etag, "size": len(data), "last_modified_us": _us(info.last_modified)}
        version["version_id"] = info.version_id
        return obj | version | {"data": data, "sha256": sha256(data), "error": None, "error_kind": None}

    def read(obj: dict[str, Any]) -> dict[str, Any]:
        try:
            if obj["whole"]:
                if obj["size"] > max_object_bytes:
                    return oversize(obj, obj["size"])
                return got(obj, *store.read(obj["key"]))  # botocore retries throttling and network errors first
            head, info = store.read_prefix(obj["key"], SNIFF_BYTES)
            if media_format(head) is None:
                version = {"etag": info.etag, "size": info.size, "last_modified_us": _us(info.last_modified)}
                version["version_id"] = info.version_id  # the version sniffed, which the plan compares next run
                return obj | version | {"data": None, "sha256": None, "error": None, "error_kind": NOT_IMAGE}
            if len(head) >= info.size:
                return got(obj, head, info)  # the prefix was the whole object
            if info.size > max_object_bytes:
                return oversize(obj, info.size)
            return got(obj, *store.read(obj["key"]))
        except StorageError as exc:
            return {**obj, "data": None, "sha256": None, "error": str(exc), "error_kind": "read"}
        except (OSError, ValueError, DiffguardError) as exc:  # a key or file the store cannot take: this object's
            error = f"cannot read {store.url(obj['key'])!r}: {type(exc).__name__}: {exc}"
            return {**obj, "data": None, "sha256": None, "error": error, "error_kind": "read"}

    with ThreadPoolExecutor(READ_THREADS) as pool:  # object stores reward concurrent GETs
        rows = list(pool.map(read, listed))
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


COUNTS = pa.schema(
    [
        ("part", pa.string()),  # its relative key under DEST
        ("rows", pa.int64()),
        ("not_image", pa.int64()),  # error_kind not_image (not counted as scanned)
        ("errors", pa.int64()),  # error set: read errors and unscorable content
        ("unscorable", pa.int64()),  # error_kind decode
        ("truncated", pa.int64()),
        ("sampled", pa.int64()),  # objects with more views than --max-views: frames sampled over display time
        ("flagged", pa.int64()),  # withheld by the policy (or unscorable)
        ("reported", pa.int64()),  # released with the policy's `flag` action
        ("read", pa.int64()),  # read whole (sha256 set): scored, or unscorable after reading
        ("bytes", pa.int64()),  # their sizes
    ]
)


def write_part(batch: pa.Table, parts: WorkerParts) -> pa.Table:
    """Scored rows -> one part under DEST, committed by this worker -> one row of COUNTS (a Ray Data stage).

    Unlike the other stages it returns one row per batch, not per object: only these counts reach the driver. A
    failed write raises (after the store's own retries), which fails the job: the rows stay uncommitted, and the
    rerun scores them."""
    kinds, fetched = batch["error_kind"], pc.is_valid(batch["sha256"])  # sha256: of the bytes read whole
    counts = {
        "part": parts.commit(batch),
        "rows": batch.num_rows,
        "not_image": pc.sum(pc.equal(kinds, NOT_IMAGE)).as_py() or 0,
        "errors": batch.num_rows - batch["error"].null_count,
        "unscorable": pc.sum(pc.equal(kinds, "decode")).as_py() or 0,
        "truncated": pc.sum(pc.fill_null(batch["truncated"], False)).as_py() or 0,
        "sampled": pc.sum(pc.fill_null(batch["views_sampled"], False)).as_py() or 0,
        "flagged": pc.sum(pc.fill_null(batch["flagged"], False)).as_py() or 0,
        "reported": pc.sum(pc.equal(batch["action"], "flag")).as_py() or 0,
        "read": pc.sum(fetched).as_py() or 0,
        "bytes": pc.sum(pc.if_else(fetched, batch["size"], 0)).as_py() or 0,
    }
    return pa.Table.from_pylist([counts], schema=COUNTS)


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


# --- the driver ---------------------------------------------------------------------------------------------------
def ensure_ray(metrics_port: int | None = None) -> bool:
    """Connect to $RAY_ADDRESS, or start a local Ray (its metrics agent on ``metrics_port``: only for a Ray started
    here). Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"
    filter_stderr()  # at the CLI's default verbosity: Ray's known noise on fd 2 (pipeline.raylogs.NOISE) dropped
    port = {"_metrics_export_port": metrics_port} if metrics_port is not None else {}
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **port)
    return True


def metrics_refusal(metrics_port: int | None) -> str | None:
    """Why a scan cannot start its own Ray with its metrics on ``metrics_port`` (None: it can, or no port asked)."""
    if metrics_port is None:
        return None
    if address := os.environ.get("RAY_ADDRESS"):
        return (
            f"--metrics-port {metrics_port}: this scan joins the Ray cluster at RAY_ADDRESS={address}, whose nodes "
            "export the scan's metrics on their own port (8080 on KubeRay); drop --metrics-port or unset RAY_ADDRESS"
        )
    if ray_running():
        node = getattr(sys.modules["ray"]._private.worker.global_worker, "node", None)  # None: a Ray Client
        where = f"http://127.0.0.1:{node.metrics_export_port}/metrics" if node is not None else "the cluster's nodes"
        return (
            f"--metrics-port {metrics_port}: Ray already runs in this process and the scan uses it; its metrics are "
            f"on its own port, {where}; drop --metrics-port"
        )
    return None


class RayRunner(Runner):
    """The shard functions as Ray tasks: arguments that are object references are resolved by Ray, and results stay
    in the object store until a task takes them (the driver holds references and counts)."""

    remote = True

    def __init__(self) -> None:
        import ray

        self._ray, self._remote = ray, {}

    def call(self, fn: Any, *args: Any, num_returns: int = 1, retry: bool = True) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(fn)
        options = {"num_returns": num_returns, "num_cpus": SHARD_CPUS, "max_retries": 3 if retry else 0}
        return self._remote[fn].options(**options).remote(*args)

    def get(self, value: Any) -> Any:
        try:
            return self._ray.get(value)
        except self._ray.exceptions.RayTaskError as exc:  # a shard task failed: the run fails, the rerun resumes
            if (error := _job_error(exc)) is not exc:
                raise error from exc
            raise

    def put(self, value: Any) -> Any:
        return self._ray.put(value)


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run_scan(cfg: ScanConfig) -> ScanSummary:
    """Plan, score, act and commit one run. The driver lists (or has tasks list), sizes the shards, and commits; the
    rows live in the shard tasks (:mod:`pipeline.scan.shards`) and the Ray Data stream, except for a small scan
    (:data:`LOCAL_ROWS` objects at most, no Ray running), planned and committed in this process. One scan per DEST at
    a time: the run holds DEST's lock throughout (:mod:`pipeline.scan.lock`; :class:`DestBusy` when another scan
    holds it). The run's progress is exported as metrics while it runs (:mod:`pipeline.scan.progress`)."""
    if refusal := metrics_refusal(cfg.metrics_port):
        raise InvalidInput(refusal)
    with DestLock.acquire(layout(cfg)[1], break_lock=cfg.break_lock, wait_s=cfg.lock_wait_s) as lock:
        return _run(cfg, lock)


def _run(cfg: ScanConfig, lock: DestLock) -> ScanSummary:
    source, dest, quarantine, exclude = layout(cfg)
    next(iter(source.store.list(source.prefix)), None)  # fail fast, with the bucket and credential source, on no access
    manifest = read_manifest(dest)
    if manifest.get("source", str(source)) != str(source):
        raise InvalidInput(f"--output {dest} holds results for {manifest['source']}, not {source}")
    migrate(dest)  # a format-1 DEST (snapshots/) becomes the Delta table, once
    meta = load_meta(dest)
    checker = cfg.checker.load(device="cpu", dtype="float32")  # the fingerprint and preprocessing the actors must match
    if banner := demo_banner(checker.parts):
        log.warning("WARNING: %s", banner)
    run = lock.claim(meta.last_run + 1)  # the number is taken under the lock: no other scan shares it
    summary = ScanSummary(str(source), cfg.output, run, checker.fingerprint, checker.demo)
    summary.unscorable_action = checker.concepts.unscorable_action
    writer = PartWriter(dest, summary.run)
    action = "quarantine" if quarantine is not None else "tag" if cfg.tag else None
    owned = not ray_running()  # a Ray this run starts (for listing, planning or scoring) is shut down at its end
    # metrics only where they can be scraped: a cluster (joined, or running here) or --metrics-port; else no actor
    scraped = not owned or bool(os.environ.get("RAY_ADDRESS")) or cfg.metrics_port is not None
    progress = ScanProgress(str(dest), enabled=scraped)
    started = time.monotonic()
    try:
        if scraped:  # metrics from the start (a long listing is watched too): the Ray that exports them, up first
            ensure_ray(cfg.metrics_port)
        if cfg.metrics_port is not None:
            log.info("scan metrics (Prometheus): http://127.0.0.1:%d/metrics", cfg.metrics_port)
        progress.start()  # running 1 until the finally below: a killed driver leaves it at 1 (the alert's case)
        recovered, pending, refused = _recover(dest, source, quarantine, meta, writer, cfg)
        pieces, listed = _list(cfg, source, exclude, summary)
        progress.listed(listed)
        if recovered:
            meta = load_meta(dest)
        recorded = sum(max(rows, 0) for _, rows in meta.files)
        shards = shard_count(max(listed, recorded), (sharded_files(meta.files) or (1, {}))[0], cfg.shard_rows)
        if shards > 1 or max(listed, recorded) > LOCAL_ROWS:  # the shards' rows stay in tasks and the object store
            ensure_ray()
            progress.flush()
            runner: Runner = RayRunner()
            pieces = [p if not isinstance(p, pa.Table) else runner.put(p) for p in pieces]
        else:  # a small scan: its rows fit in the driver, and tasks would cost more than they spread
            runner = Runner()
            refs = [p for p in pieces if not isinstance(p, pa.Table)]
            pieces = [p for p in pieces if isinstance(p, pa.Table)] + (RayRunner().get(refs) if refs else [])
        per_task = max(1, SPLIT_ROWS // max(1, listed // max(1, len(pieces))))  # listing pieces split by one task
        listing = scatter_listing(runner, pieces, shards, per_task)
        del pieces
        spec = PlanSpec(checker.fingerprint, _limits(cfg), cfg.full, action)
        counts, todo = _plan(runner, spec, current_inputs(runner, dest, meta, shards, PLAN_COLUMNS), listing)
        total = {k: sum(c[k] for c in counts) for k in counts[0]}
        summary.listed, summary.skipped_unchanged = listed, total["unchanged"]
        summary.skipped_non_image = total["non_image"]
        log.info(
            "%d objects listed: %d to read, %d unchanged, %d recorded as not images (%d shards, planned in %.1f s)",
            listed,
            total["todo"],
            total["unchanged"],
            total["non_image"],
            shards,
            time.monotonic() - started,
        )
        if total["todo"]:
            bucket = source.store.bucket if isinstance(source.store, S3Store) else source.store.root  # type: ignore[attr-defined]
            _score(cfg, todo, total["todo"], source.store, bucket, checker, writer, summary, progress)
        del checker, todo
        restored, decisions = _reviews(cfg, dest, source, quarantine, writer, summary)
        meta = load_meta(dest)  # the staged parts now include this run's
        inputs = current_inputs(runner, dest, meta, shards, None)
        if inputs.rewrite and meta.table_version is not None:
            log.info("the table is cut into %d shards this run: every shard file is rewritten, once", shards)
        released = summary.release is not None and summary.release.done > 0  # rows committed after the plan
        every = inputs.rewrite or released or bool(restored)
        finish = [
            s
            for s, c in enumerate(counts)
            if every or c["todo"] or c["staged"] or c["gone"] or (action and (c["pending"] or decisions))
        ]
        parts = writer.workers() if action else None
        finishing = (dest, summary.run, shards, inputs.rewrite, source, quarantine, action, cfg.apply, parts)
        results = _finish(runner, FinishSpec(*finishing, decisions, restored), inputs, listing, finish, progress)
        summary.actions = ActionReport(action, cfg.apply, recovered=recovered, pending=pending, refused=refused)
        for r in results.values():
            for name in ("eligible", "done", "failed"):
                setattr(summary.actions, name, getattr(summary.actions, name) + r["report"][name])
        if action and not cfg.apply and summary.actions.eligible:
            log.info("dry run: would %s %d withheld objects (add --apply to act)", action, summary.actions.eligible)
        manifest_summary = {  # demo: the review page warns that these verdicts are meaningless
            **summary.as_json(),
            "run": summary.run,
            "fingerprint": summary.fingerprint,
            "demo": summary.demo,
        }
        lock.check()  # a run whose lock was taken over (--break-lock, or a stale heartbeat) never commits
        manifest = commit_run(dest, summary.run, str(source), meta, inputs, results, manifest_summary, lock.run_id)
        log.info(
            "run %d committed as version %d: %d rows, %d of %d shard files rewritten, %.1f s",
            summary.run,
            manifest["version"],
            manifest["rows"],
            sum(r["add"] is not None for r in results.values()),
            shards,
            time.monotonic() - started,
        )
    finally:
        progress.end()  # running 0, before the Ray this run owns (and its holder) goes
        if owned and ray_running():
            import ray

            ray.shutdown()
    return summary


def _limits(cfg: ScanConfig) -> DecodeLimits:
    return DecodeLimits(max_pixels=cfg.checker.max_pixels, max_bytes=cfg.checker.max_object_bytes)


def _list(cfg: ScanConfig, source: Location, exclude: list[str], summary: ScanSummary) -> tuple[list[Any], int]:
    """SOURCE's objects as listing pieces (tables here, or references to tables in Ray's object store), and how many:
    from an S3 Inventory report, by prefix fan-out, or walked by the driver."""
    if cfg.inventory:
        ensure_ray()
        return _inventory_pieces(cfg, source, exclude)
    if isinstance(source.store, S3Store) and cfg.list_parallelism != 1:
        pieces, listed, summary.listing_tasks = fanout_pieces(
            source, exclude, cfg.list_parallelism, cfg.list_fanout_min
        )
        return pieces, listed
    objects, summary.skipped_symlinks = list_source(source, exclude)
    return [objects], objects.num_rows


def _plan(runner: Runner, spec: PlanSpec, inputs: Any, listing: list[list[Any]]) -> tuple[list[dict], list[Any]]:
    """Each shard's plan (a task per shard): its counts, and the work items of the shards with objects to read."""
    planned = [
        runner.call(
            plan_shard,
            spec,
            len(listing[s]),
            len(inputs.table[s]),
            *listing[s],
            *inputs.table[s],
            *inputs.staged[s],
            num_returns=2,
        )
        for s in range(inputs.shards)
    ]
    counts = runner.get([c for _, c in planned])
    return counts, [t for (t, _), c in zip(planned, counts, strict=True) if c["todo"]]


def _finish(
    runner: Runner,
    spec: FinishSpec,
    inputs: Any,
    listing: list[list[Any]],
    shards: list[int],
    progress: ScanProgress,
) -> dict[int, dict[str, Any]]:
    """Finish the given shards (a task each): their actions and their new table files, counted in ``progress`` as
    each shard finishes. Not retried by Ray: a finish that died mid-action is resumed by the next run, from the journal
    and the parts it committed."""
    ref = runner.put(spec)
    refs = [
        runner.call(
            finish_shard,
            ref,
            s,
            len(listing[s]),
            len(inputs.table[s]),
            *listing[s],
            *inputs.table[s],
            *inputs.staged[s],
            retry=False,
        )
        for s in shards
    ]
    results = {}
    for i, result in _as_completed(runner, refs):
        results[shards[i]] = result
        progress.acted(result["report"])
    return {s: results[s] for s in shards}


def _as_completed(runner: Runner, refs: list[Any]) -> Iterator[tuple[int, Any]]:
    """(index, result) of each of ``refs`` as it completes (Ray tasks), or in order (run in this process)."""
    if not runner.remote:
        yield from enumerate(runner.get(refs))
        return
    import ray

    index, pending = {ref: i for i, ref in enumerate(refs)}, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield index[done[0]], runner.get(done[0])


def _recover(dest: Location, source: Location, quarantine: Location | None, meta, writer: PartWriter, cfg: ScanConfig):  # noqa: ANN001, ANN202
    """Finish or forget quarantine moves and releases a killed run left in the journals: only the rows of the
    objects named there are read from the current view. Returns (recovered, pending, refused)."""
    keys = journal_keys(dest)
    if not keys:
        return 0, 0, 0
    current = lookup_rows(dest, meta, keys)
    recovered, pending, refused = recover(dest, source, quarantine, current, writer, cfg.apply, cfg.endpoint_url)
    released, refused_releases = recover_releases(dest, source, current, writer, cfg.apply, quarantine)
    return recovered + released, pending, refused + refused_releases


def journal_keys(dest: Location) -> list[str]:
    """The object keys named by the quarantine and release journals (moves a killed run left in flight)."""
    keys = []
    for journal in (QUARANTINE_JOURNAL, RELEASE_JOURNAL):
        for info in dest.store.list(dest.key(journal)):
            try:  # untrusted: a malformed entry is refused (and reported) by the recovery, not here
                key = json.loads(dest.store.read(info.key)[0]).get("key")
            except (ValueError, AttributeError):
                continue
            if isinstance(key, str):
                keys.append(key)
    return keys


def lookup_rows(dest: Location, meta, keys: list[str]) -> pa.Table:  # noqa: ANN001
    """The current rows of ``keys`` (a journal's or the reviews' objects), read file by file in this process."""
    value_set = pa.array(sorted(set(keys)), pa.string())
    pieces = [lookup(value_set, TableFile(dest, f"{TABLE}/{path}")) for path, _ in meta.files]
    pieces += [lookup(value_set, TableFile(dest, rel)) for rel in meta.parts]
    return current_of(pieces)


def _reviews(cfg: ScanConfig, dest: Location, source: Location, quarantine, writer: PartWriter, summary: ScanSummary):  # noqa: ANN001, ANN202
    """--release, then the review decisions in force (key -> decision) for the reviewed objects' current rows.
    Returns (key -> etag of the objects released back into SOURCE, decisions)."""
    latest = DecisionLog.open(dest, cfg.endpoint_url).latest()
    if not latest:
        if cfg.release:
            summary.release = ReleaseReport(cfg.apply)
        return {}, {}
    reviewed = sorted({key for key, _ in latest})
    current = lookup_rows(dest, load_meta(dest), reviewed)
    restored: dict[str, str] = {}
    if cfg.release:
        summary.release, restored = release(cfg.apply, current, source, dest, writer, cfg.endpoint_url, quarantine)
        if restored:
            current = lookup_rows(dest, load_meta(dest), reviewed)
    decisions = {k: d.decision for k, d in current_decisions(dest, current, cfg.endpoint_url).items()}
    summary.overturned = sum(1 for d in decisions.values() if d == "overturn")
    return restored, decisions


def read_inventory(batch: pa.Table, inventory: Inventory, source: Location, exclude: list[str]) -> pa.Table:
    """Inventory data files (``key``, ``md5``) -> the listing rows they hold for SOURCE (a Ray Data stage)."""
    tables = [
        inventory_listing(read_file(inventory, key, md5), source, inventory.source_bucket, exclude).cast(LISTING_SCHEMA)
        for key, md5 in zip(batch["key"].to_pylist(), batch["md5"].to_pylist(), strict=True)
    ]
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def _inventory_pieces(cfg: ScanConfig, source: Location, exclude: list[str]) -> tuple[list[Any], int]:
    """SOURCE's objects as an S3 Inventory report lists them: a Ray Dataset, one read task per data file, materialized
    in the object store. Returns its blocks (references) and the number of objects."""
    import ray
    import ray.data

    quiet_ray_data()
    inventory = load_manifest(cfg.inventory, cfg.endpoint_url)  # type: ignore[arg-type]
    check_source(inventory, source)
    if not inventory.files:
        return [], 0
    files = [{"key": key, "md5": md5} for key, md5 in inventory.files]
    ds = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        read_inventory,
        fn_kwargs={"inventory": inventory, "source": source, "exclude": exclude},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=DECODE_CPUS,
    )
    ds.context.raise_original_map_exception = True  # a file that fails its MD5 check names itself
    try:
        listed = ds.materialize()
    except Exception as exc:
        if (error := _job_error(exc)) is not exc:
            raise error from exc
        raise
    log.info("inventory %s: %d objects under %s", inventory.manifest, listed.count(), source)
    return listed.to_arrow_refs(), listed.count()


def fanout_listing(
    source: Location, exclude: list[str], parallelism: int | None = None, fanout_min: int | None = None
) -> tuple[pa.Table, int]:
    """An S3 SOURCE's objects (:data:`LISTING_SCHEMA`, sorted by key) listed by prefix fan-out (:func:`fanout_pieces`)
    and brought into this process. Returns the listing and the number of listing tasks."""
    started = not ray_running()
    try:
        pieces, _, tasks = fanout_pieces(source, exclude, parallelism, fanout_min)
        if any(not isinstance(p, pa.Table) for p in pieces):
            import ray

            pieces = [p if isinstance(p, pa.Table) else ray.get(p) for p in pieces]
    finally:
        if started and ray_running():
            import ray

            ray.shutdown()
    return combine(pieces), tasks


def fanout_pieces(
    source: Location, exclude: list[str], parallelism: int | None = None, fanout_min: int | None = None
) -> tuple[list[Any], int, int]:
    """An S3 SOURCE's objects listed by prefix fan-out: an exact partition of the key space
    (:func:`pipeline.scan.listing.partition`), each group of prefixes listed whole by one Ray task, ``parallelism``
    at once (None: two per CPU of the cluster); the listed rows stay in the object store. A SOURCE of at most
    ``fanout_min`` objects is listed by one paginator here, without starting Ray (None: 1,000 when a Ray cluster is
    up or $RAY_ADDRESS names one, else 100,000: below that, starting a local Ray costs more than the LIST calls it
    spreads). Returns the pieces (tables, or references to them), the number of objects and of listing tasks (0: no
    Ray was started)."""
    if fanout_min is None:  # without importing Ray (a second) for a small listing
        fanout_min = FANOUT_MIN if ray_running() or os.environ.get("RAY_ADDRESS") else LOCAL_FANOUT_MIN
    store: S3Store = source.store  # type: ignore[assignment]
    versions = store.versioned()
    small = small_listing(store, source.prefix, fanout_min, versions) if fanout_min else None
    if small is not None:
        objects = without(listing_table(small), exclude)
        return [objects], objects.num_rows, 0
    import ray

    ensure_ray()
    parallelism = parallelism or max(1, int(ray.cluster_resources().get("CPU", 1) / LIST_CPUS))
    target = PREFIXES_PER_TASK * parallelism
    split_ = partition(store, source.prefix, target, exclude, parallelism, versions)
    groups = split_.groups(target, exclude)
    task = ray.remote(num_returns=2, num_cpus=LIST_CPUS)(counted)
    first = without(listing_table(split_.objects), exclude)
    pieces, listed, running = [ray.put(first)], first.num_rows, []
    try:
        for group in groups:  # at most `parallelism` tasks in flight; their rows stay in the object store
            if len(running) >= parallelism:
                done, running = ray.wait(running, num_returns=1)
                listed += sum(ray.get(done))
            table, rows = task.remote(list_prefixes, store, group, exclude, versions)
            pieces.append(table)
            running.append(rows)
        listed += sum(ray.get(running))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DiffguardError):
            raise exc.cause from None  # the store's own message (bucket, key, credentials), as a sequential listing
        raise
    log.info("listed %d objects under %s: %d prefixes in %d tasks", listed, source, len(split_.prefixes), len(groups))
    return pieces, listed, len(groups)


def counted(fn: Any, *args: Any) -> tuple[pa.Table, int]:
    """``fn(*args)`` (a table) and its number of rows, as two results (a Ray task's two return values)."""
    table = fn(*args)
    return table, table.num_rows


def _score(cfg, todo, rows, store, bucket, checker, writer, summary, progress) -> None:  # noqa: ANN001
    """Read, decode, score and commit ``rows`` objects: ``todo`` holds the shards' work items (tables, or
    references to them in the object store). Each part's counts go to ``summary`` and ``progress`` as it arrives."""
    import ray
    import ray.data

    ensure_ray()
    progress.flush()  # what was counted before Ray ran (a small scan plans in the driver) is exported from now on
    quiet_ray_data()
    max_actors = cfg.max_actors or _default_actors(cfg.num_gpus)
    max_actors = max(1, min(max_actors, math.ceil(rows / cfg.batch_size)))
    per_block = math.ceil(rows / min(MAX_BLOCKS, math.ceil(rows / cfg.batch_size)))
    remote = [t for t in todo if not isinstance(t, pa.Table)]
    if remote:  # the shards' work items, in the object store: re-cut as they stream (no barrier)
        ds = ray.data.from_arrow_refs(remote).repartition(target_num_rows_per_block=per_block)
    else:  # a small scan's work items, here: cut into blocks now
        items = pa.concat_tables(todo)
        ds = ray.data.from_arrow([items.slice(i, per_block) for i in range(0, items.num_rows, per_block)])
    ds = ds.map_batches(
        read_objects,
        fn_kwargs={"store": store, "max_object_bytes": cfg.checker.max_object_bytes},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=DECODE_CPUS,
    )
    ds = ds.map_batches(
        decode_stage,
        fn_kwargs={
            "preprocess": checker.preprocess,
            "limits": checker.limits,
            "detectors": checker.detectors.transforms(checker.concepts),
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=DECODE_CPUS,
    )
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "spec": cfg.checker,
            "concepts": checker.concepts,
            "fingerprint": checker.fingerprint,
            "bucket": bucket,
            "threads": cfg.threads or (None if cfg.num_gpus else _default_threads(max_actors)),
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=1,
        **({"num_gpus": cfg.num_gpus} if cfg.num_gpus else {}),
    )
    ds = ds.map_batches(  # scored rows never come back to the driver: workers commit them as parts
        write_part,
        fn_kwargs={"parts": writer.workers()},
        batch_size=_part_rows(cfg),
        batch_format="pyarrow",
        num_cpus=WRITE_CPUS,
    )
    ds.context.raise_original_map_exception = True  # this dataset only: a failed part write names the part
    committed, logged, recorded = 0, time.monotonic(), summary.skipped_non_image  # non-images recorded earlier
    try:
        for counts in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # one small row per part
            total = _add_counts(summary, counts)
            progress.committed(total)
            committed += total["rows"]
            if time.monotonic() - logged >= PROGRESS_EVERY_S or committed == rows:
                log.info(  # in the summary table's words (docs/CLI.md, Words)
                    "%d of %d objects read and committed: %d scanned (%d scored, %d unscorable, %d read errors), "
                    "%d skipped: not images",
                    committed,
                    rows,
                    summary.scanned,
                    summary.scored,
                    summary.unscorable,
                    summary.errors - summary.unscorable,
                    summary.skipped_non_image - recorded,
                )
                logged = time.monotonic()
    except Exception as exc:
        if (error := _job_error(exc)) is not exc:
            raise error from exc
        raise


def _job_error(exc: Exception) -> Exception:
    """What the CLI reports for a failed job: a worker's StorageError as itself (a part that could not be written),
    another diffguard error as a job failure with its message (exit 1, like any failed job), anything else as is."""
    cause = getattr(exc, "cause", None)  # Ray's task error around the worker's own exception
    if isinstance(cause, StorageError):
        return StorageError(str(cause))
    if isinstance(cause, DiffguardError):
        return RuntimeError(f"{type(cause).__name__}: {cause}")
    return exc


def _part_rows(cfg: ScanConfig) -> int:
    """Rows per worker part: --part-rows, rounded down to whole scoring batches (a part from whole blocks)."""
    return cfg.part_rows if cfg.part_rows < cfg.batch_size else cfg.part_rows // cfg.batch_size * cfg.batch_size


def _add_counts(summary: ScanSummary, counts: pa.Table) -> dict[str, int]:
    """Add the workers' per-part counts to the run's summary; returns them summed (:data:`COUNTS` but ``part``)."""
    total = {name: pc.sum(counts[name]).as_py() or 0 for name in COUNTS.names if name != "part"}
    summary.skipped_non_image += total["not_image"]
    summary.scanned += total["rows"] - total["not_image"]
    for name in ("errors", "unscorable", "truncated", "sampled", "flagged", "reported"):
        setattr(summary, name, getattr(summary, name) + total[name])
    return total


def _default_threads(actors: int) -> int:
    """Torch threads per CPU scoring actor: the cluster's CPUs shared among the actors, at most one node's cores.

    The actors score while the 0.5-CPU read/decode tasks run beside them; decoding is a small share of the work, so
    the scoring matmuls get every core rather than the one CPU the actor reserves.
    """
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus // actors, len(os.sched_getaffinity(0))))


def _default_actors(num_gpus: float) -> int:
    import ray

    resources = ray.cluster_resources()
    if num_gpus:
        gpus = resources.get("GPU", 0)
        if not gpus:
            log.warning("--num-gpus %s but the Ray cluster reports no GPUs (yet): one actor, waiting", num_gpus)
        return max(1, int(gpus // num_gpus))
    return max(1, int(resources.get("CPU", 2)) // 2)
