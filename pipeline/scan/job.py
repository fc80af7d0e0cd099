"""The bucket scan: a Ray Data job over S3 (or a local directory) that scores every image with the core checker.

list (driver, boto3 paginator) -> plan against DEST's current view (key, etag, fingerprint) -> Ray Data:
read bytes and decode + preprocess (CPU tasks, ``map_batches``) -> score (``map_batches`` with :class:`ScoreActor`, an
actor pool holding the core ``SafetyChecker``) -> the driver commits rows as Parquet parts under DEST -> actions on
flagged objects -> compaction into a snapshot. See ``pipeline.scan_state`` for the layout and ``scan_actions`` for
quarantine/tag. Bad objects are rows with ``error``; only a job-level failure raises.

Every object under SOURCE is a candidate, whatever its name. Objects named like images (``IMAGE_SUFFIXES``) are read
whole as before and decoded; any other object first gets one ranged read of its first ``SNIFF_BYTES`` (a prefix read
locally), identified by the core's :func:`identify`; only images among them are read whole. An object that is not an
image is recorded (a ``not_image`` row, hidden from :func:`read_current`) so it is not read again while unchanged:
at most one small ranged read per object that is not an image, once. What was read but cannot be scored (undecodable,
over ``--max-pixels`` or ``--max-object-bytes``, unsupported) gets the checker's :meth:`unscorable` verdict and is
withheld like a flagged image; read errors stay retryable errors, never acted on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .checker import CheckerSpec
from .concepts import ConceptSet
from .errors import DiffguardError, ImageDecodeError, InvalidInput
from .images import IMAGE_SUFFIXES, SNIFF_BYTES, DecodeLimits, decode, identify
from .policy import image_action, withheld
from .scan_actions import ActionReport, apply_actions, quarantine_location, recover
from .scan_state import NOT_IMAGE, PartWriter, compact, load_state, rows_table
from .storage import LocalStore, Location, ObjectInfo, S3Store, StorageError, Store, parse_location, sha256

log = logging.getLogger("diffguard")

DECODE_CPUS = 0.5  # read + decode tasks: I/O-bound reads overlap with decoding
COMMIT_EVERY_S = 30.0  # commit a part at least this often, even when it has fewer than part_rows rows
MAX_BLOCKS = 4096  # input blocks for the keys (streaming granularity without per-block overhead on huge buckets)
READ_THREADS = 16  # concurrent GETs per read task
HANG_AFTER_PARTS = "DIFFGUARD_TEST_HANG_AFTER_PARTS"  # tests only: stall after N commits so a real kill lands mid-run


@dataclass(frozen=True)
class ScanConfig:
    source: str  # s3://bucket/prefix or a local directory
    output: str  # DEST: s3://bucket/prefix or a local directory
    checker: CheckerSpec = CheckerSpec()
    endpoint_url: str | None = None  # S3-compatible endpoint for every s3:// location (None: AWS / $AWS_ENDPOINT_URL)
    full: bool = False  # rescore everything, not only new or changed objects
    quarantine: str | None = None  # move flagged objects under this prefix (with apply)
    tag: bool = False  # tag flagged objects moderation=nsfw (with apply)
    apply: bool = False  # without it, actions are a dry run
    batch_size: int = 32  # rows per map_batches call in every stage
    num_gpus: float = 0.0  # per scoring actor
    max_actors: int | None = None  # scoring actors (default: GPUs / num_gpus, or half the CPUs)
    threads: int | None = None  # torch threads per CPU scoring actor (default: the cluster's CPUs / actors)
    part_rows: int = 500  # rows per committed Parquet part (a killed run loses at most this much work)


@dataclass
class ScanSummary:
    source: str
    output: str
    run: int
    fingerprint: str
    demo: bool
    listed: int = 0  # objects listed (every object is a candidate, whatever its name)
    scanned: int = 0  # images read and scored, or failed, in this run
    skipped_unchanged: int = 0
    skipped_non_image: int = 0  # not images by their first bytes (sniffed in this run, or recorded and unchanged)
    skipped_symlinks: int = 0  # local sources: symlinks and other non-regular files, never followed nor read
    flagged: int = 0  # of those scanned: withheld by the policy, or unscorable (what --quarantine/--tag act on)
    reported: int = 0  # of those scanned: released with the policy's `flag` action (reported, not withheld)
    errors: int = 0  # of those scanned: unscorable content (also counted in flagged) and read errors
    unscorable: int = 0  # of the errors: read but not scorable (withheld by the policy's unscorable_action)
    truncated: int = 0  # of those scanned: truncated files scored on what decodes
    actions: ActionReport = field(default_factory=lambda: ActionReport(None, False))

    def as_json(self) -> dict[str, Any]:
        keys = ("scanned", "skipped_unchanged", "skipped_non_image", "skipped_symlinks", "flagged", "errors")
        return {**{k: getattr(self, k) for k in keys}, "output": self.output}


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
            if identify(head) is None:
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


def decode_and_preprocess(batch: pa.Table, preprocess: Any, limits: DecodeLimits) -> pa.Table:
    """Bytes -> the checker's input pixels (B, 3, H, W) float32 with the core's decoder and preprocessing.

    Truncated files are decoded as far as they go (``truncated``); what cannot be decoded is that row's error."""
    from ray.data.extensions import ArrowTensorArray

    errors, kinds = batch["error"].to_pylist(), batch["error_kind"].to_pylist()
    arrays: dict[int, np.ndarray] = {}
    truncated = [False] * batch.num_rows
    for i, body in enumerate(batch["data"].to_pylist()):
        if errors[i] is not None or kinds[i] is not None:
            continue
        try:
            decoded = decode(body, limits)
        except ImageDecodeError as exc:
            errors[i], kinds[i] = str(exc), "decode"
            continue
        arrays[i], truncated[i] = decoded.array, decoded.truncated
    ch, cw = preprocess.crop
    pixels = np.zeros((batch.num_rows, 3, ch, cw), np.float32)  # rows without an image stay zero and are not scored
    if arrays:
        try:
            pixels[list(arrays)] = preprocess(list(arrays.values())).numpy()
        except Exception:  # noqa: BLE001 - find the bad image instead of failing the batch
            for i, arr in arrays.items():
                try:
                    pixels[i] = preprocess([arr]).numpy()[0]
                except Exception as exc:  # noqa: BLE001
                    errors[i], kinds[i] = f"cannot preprocess image: {exc}", "decode"
    table = batch.drop_columns(["data", "error", "error_kind", "whole"])
    table = table.append_column("error", pa.array(errors, pa.string()))
    table = table.append_column("error_kind", pa.array(kinds, pa.string()))
    table = table.append_column("truncated", pa.array(truncated, pa.bool_()))
    return table.append_column("pixels", ArrowTensorArray.from_numpy(pixels))


class ScoreActor:
    """A Ray Data callable class holding the core checker: pixels in, result rows out."""

    def __init__(self, spec: CheckerSpec, concepts: ConceptSet, fingerprint: str, bucket: str, threads: int | None):
        if threads:  # Ray gives a 1-CPU actor OMP_NUM_THREADS=1: a third of a 2-core machine's matmul throughput
            import torch

            torch.set_num_threads(threads)
        self.checker = spec.load(concepts=concepts)
        if self.checker.fingerprint != fingerprint:
            raise InvalidInput(
                f"the checker loaded on this worker has fingerprint {self.checker.fingerprint}, the driver's is "
                f"{fingerprint}: model {spec.model!r} differs between nodes"
            )
        self.bucket, self.max_pixels, self.max_object_bytes = bucket, spec.max_pixels, spec.max_object_bytes

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from .checker import Verdict

        meta = batch.drop_columns(["pixels"]).to_pylist()
        pixels = np.concatenate([chunk.to_numpy() for chunk in batch["pixels"].chunks])  # (B, 3, H, W) float32
        ok = np.array([m["error"] is None and m["error_kind"] is None for m in meta], bool)
        verdicts = iter(self.checker.check_pixels(torch.from_numpy(pixels[ok])) if ok.any() else [])
        now = datetime.now(UTC)
        rows = []
        for m, scored in zip(meta, ok, strict=True):
            kind = m["error_kind"]
            if scored:  # scored: the policy decides
                verdict = next(verdicts)
                verdict.truncated = bool(m["truncated"])
                action, flagged = image_action(verdict), withheld(verdict)
            elif kind == "decode":  # read, but not scorable: the policy's unscorable_action (block by default)
                verdict = self.checker.unscorable(m["error"])
                action, flagged = verdict.action, withheld(verdict)
            elif kind == NOT_IMAGE:  # recorded so that it is not read again while unchanged
                verdict, action, flagged = Verdict(), None, False
            else:  # a read error is not content: retried next run, never acted on
                verdict, action, flagged = Verdict.failed(m["error"]), None, False
            rows.append(
                {
                    "bucket": self.bucket,
                    **{k: m[k] for k in ("key", "etag", "size", "sha256", "version_id")},
                    "last_modified": datetime.fromtimestamp(m["last_modified_us"] / 1e6, UTC),
                    **verdict.to_dict(),
                    "action": action,
                    "flagged": flagged,
                    "error_kind": kind,
                    "model_fingerprint": self.checker.fingerprint,
                    "max_pixels": self.max_pixels,
                    "max_object_bytes": self.max_object_bytes,
                    "scanned_at": now,
                    "quarantined_to": None,
                    "tagged": False,
                }
            )
        return rows_table(rows)


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


# --- the driver ---------------------------------------------------------------------------------------------------
def ensure_ray() -> bool:
    """Connect to $RAY_ADDRESS, or start a local Ray. Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return True


def list_source(source: Location, exclude: list[str]) -> tuple[list[ObjectInfo], int]:
    """Every object under the source (sorted by key), and the number of symlinks and other non-regular files a local
    source holds (never followed nor read)."""
    skipped: list[str] = []
    if isinstance(source.store, LocalStore):
        listing = source.store.list(source.prefix, skipped=skipped)
    else:
        listing = source.store.list(source.prefix)
    objects = [info for info in listing if not any(info.key.startswith(p) for p in exclude)]
    skipped = [k for k in skipped if not any(k.startswith(p) for p in exclude)]
    if skipped:
        log.warning("skipped %d symlinks or special files, never followed (e.g. %s)", len(skipped), skipped[0])
    return sorted(objects, key=lambda o: o.key), len(skipped)


def named_image(key: str) -> bool:
    """Named like an image: read whole rather than sniffed first (the content still decides)."""
    return Path(key).suffix.lower() in IMAGE_SUFFIXES


def same_version(obj: ObjectInfo, etag: Any, size: Any, modified: Any, version_id: Any) -> bool:
    """The listed object is the version a row describes: etag and size, the modification time to the second (S3
    sets it on every write; locally the etag holds it to the nanosecond, with ctime and inode), and the version id
    when the bucket lists one."""
    if etag != obj.etag or size != obj.size:
        return False
    if modified is not None and int(modified.timestamp()) != int(obj.last_modified.timestamp()):
        return False
    return obj.version_id is None or version_id == obj.version_id


def plan(objects: list[ObjectInfo], current: pa.Table, fingerprint: str, limits: DecodeLimits, full: bool):
    """Split the listing into objects to read and objects whose current row still holds.

    Returns (todo, unchanged images, unchanged non-images)."""
    if full or current.num_rows == 0:
        return objects, 0, 0
    cols = ("key", "etag", "size", "last_modified", "version_id", "model_fingerprint", "error_kind", "max_pixels")
    cols += ("max_object_bytes", "unscorable")
    rows = {r[0]: r[1:] for r in zip(*(current[c].to_pylist() for c in cols), strict=True)}
    todo, unchanged, others = [], 0, 0
    for obj in objects:
        row = rows.get(obj.key)
        if row is None or not same_version(obj, *row[:4]):
            todo.append(obj)
            continue
        fp, kind, max_pixels, max_bytes, unscorable = row[4:]
        if kind == NOT_IMAGE:
            others += 1  # its bytes did not change: still not an image, whatever the model
        elif fp != fingerprint or kind == "read":
            todo.append(obj)  # a new model or policy rescores; a read error is retried
        elif kind == "decode" and (not unscorable or (max_pixels, max_bytes) != (limits.max_pixels, limits.max_bytes)):
            todo.append(obj)  # a row from before unscorable verdicts, or a limit that moved
        else:
            unchanged += 1
    return todo, unchanged, others


def _layout(cfg: ScanConfig) -> tuple[Location, Location, Location | None, list[str]]:
    source = parse_location(cfg.source, cfg.endpoint_url, "SOURCE")
    dest = parse_location(cfg.output, cfg.endpoint_url, "--output")
    quarantine = quarantine_location(cfg.quarantine, source, cfg.endpoint_url) if cfg.quarantine else None
    if isinstance(source.store, LocalStore) and not Path(source.store.root).is_dir():
        raise InvalidInput(f"SOURCE {cfg.source!r} is not a directory (or an s3://bucket/prefix)")
    if cfg.tag and not isinstance(source.store, S3Store):
        raise InvalidInput("--tag sets S3 object tags and needs an s3:// SOURCE; for a directory use --quarantine")
    exclude = []
    for name, loc in (("--output", dest), ("--quarantine", quarantine)):
        if loc is None:
            continue
        if source.within(loc) is not None:
            raise InvalidInput(f"{name} {loc} must not be SOURCE {source} or contain it")
        if (inside := loc.within(source)) is not None:
            exclude.append(inside)  # never scan our own results or the quarantine
    return source, dest, quarantine, exclude


def run_scan(cfg: ScanConfig) -> ScanSummary:
    source, dest, quarantine, exclude = _layout(cfg)
    next(iter(source.store.list(source.prefix)), None)  # fail fast, with the bucket and credential source, on no access
    state = load_state(dest)
    if state.manifest.get("source", str(source)) != str(source):
        raise InvalidInput(f"--output {dest} holds results for {state.manifest['source']}, not {source}")
    checker = cfg.checker.load(device="cpu", dtype="float32")  # the fingerprint and preprocessing the actors must match
    if checker.demo:
        from .models import TINY_BANNER

        log.warning("WARNING: %s", TINY_BANNER)
    summary = ScanSummary(str(source), cfg.output, state.last_run + 1, checker.fingerprint, checker.demo)
    writer = PartWriter(dest, summary.run)
    recovered, pending = recover(dest, source, state.current, writer, cfg.apply, cfg.endpoint_url)
    objects, summary.skipped_symlinks = list_source(source, exclude)
    if recovered:
        state = load_state(dest)
    limits = DecodeLimits(max_pixels=cfg.checker.max_pixels, max_bytes=cfg.checker.max_object_bytes)
    todo, summary.skipped_unchanged, summary.skipped_non_image = plan(
        objects, state.current, checker.fingerprint, limits, cfg.full
    )
    summary.listed = len(objects)
    log.info(
        "%d objects listed: %d to read, %d unchanged, %d recorded as not images",
        len(objects),
        len(todo),
        summary.skipped_unchanged,
        summary.skipped_non_image,
    )
    if todo:
        bucket = source.store.bucket if isinstance(source.store, S3Store) else source.store.root  # type: ignore[attr-defined]
        _score(cfg, todo, source.store, bucket, checker, writer, summary)
    del checker
    action = "quarantine" if quarantine is not None else "tag" if cfg.tag else None
    listed = {o.key: o.etag for o in objects}
    current = load_state(dest).current
    summary.actions = apply_actions(action, cfg.apply, current, listed, source, quarantine, dest, writer)
    summary.actions.recovered, summary.actions.pending = recovered, pending
    manifest_summary = {**summary.as_json(), "run": summary.run, "fingerprint": summary.fingerprint}
    compact(dest, summary.run, str(source), set(listed), manifest_summary)
    return summary


def _score(cfg, todo, store, bucket, checker, writer, summary) -> None:  # noqa: ANN001
    import ray

    started = ensure_ray()
    try:
        max_actors = cfg.max_actors or _default_actors(cfg.num_gpus)
        max_actors = max(1, min(max_actors, math.ceil(len(todo) / cfg.batch_size)))
        items = [
            {
                "key": o.key,
                "etag": o.etag,
                "size": o.size,
                "last_modified_us": _us(o.last_modified),
                "version_id": o.version_id,
                "whole": named_image(o.key),
            }
            for o in todo
        ]
        ds = ray.data.from_items(items, override_num_blocks=min(MAX_BLOCKS, math.ceil(len(items) / cfg.batch_size)))
        ds = ds.map_batches(
            read_objects,
            fn_kwargs={"store": store, "max_object_bytes": cfg.checker.max_object_bytes},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_cpus=DECODE_CPUS,
        )
        ds = ds.map_batches(
            decode_and_preprocess,
            fn_kwargs={
                "preprocess": checker.preprocess,
                "limits": DecodeLimits(max_pixels=cfg.checker.max_pixels, max_bytes=cfg.checker.max_object_bytes),
            },
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_cpus=DECODE_CPUS,
        )
        ds = ds.map_batches(
            ScoreActor,
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
        pending: list[pa.Table] = []
        last_commit = time.monotonic()
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            pending.append(block)
            if sum(t.num_rows for t in pending) >= cfg.part_rows or time.monotonic() - last_commit >= COMMIT_EVERY_S:
                _commit(writer, pending, summary)
                last_commit = time.monotonic()
        _commit(writer, pending, summary)
    finally:
        if started:
            ray.shutdown()


def _commit(writer: PartWriter, pending: list[pa.Table], summary: ScanSummary) -> None:
    if not pending:
        return
    table = pa.concat_tables(pending)
    pending.clear()
    writer.commit(table)
    kinds = table["error_kind"].to_pylist()
    summary.skipped_non_image += kinds.count(NOT_IMAGE)
    summary.scanned += table.num_rows - kinds.count(NOT_IMAGE)
    summary.errors += table.num_rows - table["error"].null_count
    summary.unscorable += kinds.count("decode")
    summary.truncated += sum(bool(v) for v in table["truncated"].to_pylist())
    summary.flagged += sum(bool(v) for v in table["flagged"].to_pylist())
    summary.reported += sum(a == "flag" for a in table["action"].to_pylist())
    if (n := os.environ.get(HANG_AFTER_PARTS)) and writer.parts >= int(n):
        log.warning("%s=%s: stalling so a test can kill this run", HANG_AFTER_PARTS, n)
        time.sleep(3600)


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
