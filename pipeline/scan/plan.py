"""What a scan will do, decided without Ray: its configuration, the listing, and which objects to read.

Every object under SOURCE is a candidate, whatever its name (:func:`list_source`); :func:`plan` compares the listing
with DEST's current view (key, etag, size, modification time, version id, fingerprint, limits) and keeps only what
is new, changed or due again. :func:`layout` checks SOURCE, DEST and the quarantine against each other.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InvalidInput
from ..images import IMAGE_SUFFIXES, DecodeLimits
from ..policy import WITHHELD
from ..spec import CheckerSpec
from ..storage import LocalStore, Location, ObjectInfo, S3Store, parse_location
from .actions import ActionReport, quarantine_location
from .state import NOT_IMAGE

log = logging.getLogger("diffguard")


SHARD_ROWS = 1_000_000  # objects per shard by default


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
    release: bool = False  # move overturned objects (diffguard review) back out of quarantine, untag them (with apply)
    batch_size: int = 32  # rows per map_batches call in every stage
    num_gpus: float = 0.0  # per scoring actor
    max_actors: int | None = None  # scoring actors (default: GPUs / num_gpus, or half the CPUs)
    threads: int | None = None  # torch threads per CPU scoring actor (default: the cluster's CPUs / actors)
    part_rows: int = 500  # rows per committed Parquet part (a killed run loses at most this much work)
    inventory: str | None = None  # an S3 Inventory manifest.json listing SOURCE's bucket (instead of LIST calls)
    list_parallelism: int | None = None  # S3 listing tasks at once (None: the cluster's CPUs x 2; 1: one paginator)
    list_fanout_min: int | None = None  # S3 SOURCEs of at most this many objects: one paginator (None: automatic)
    shard_rows: int = SHARD_ROWS  # objects per shard: what one plan or finish task holds (pipeline.scan.shards)
    break_lock: bool = False  # take DEST's lock even from a live holder (pipeline.scan.lock: one scan per DEST)
    lock_wait_s: float = 0.0  # on a busy DEST, try again for this long (until the lock ends or goes stale) first
    metrics_port: int | None = None  # start a local Ray with its metrics agent on this port (not with RAY_ADDRESS)

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not (isinstance(self.metrics_port, int) and 0 < self.metrics_port < 65536):
            raise InvalidInput(f"metrics_port must be a TCP port, 1-65535 (or None), got {self.metrics_port!r}")
        if not (isinstance(self.shard_rows, int) and self.shard_rows >= 1):
            raise InvalidInput(f"shard_rows must be an integer >= 1, got {self.shard_rows!r}")
        if self.list_parallelism is not None and not (
            isinstance(self.list_parallelism, int) and self.list_parallelism >= 1
        ):
            raise InvalidInput(
                f"list_parallelism must be an integer >= 1 (or None: automatic), got {self.list_parallelism!r}"
            )
        if self.list_fanout_min is not None and not (
            isinstance(self.list_fanout_min, int) and self.list_fanout_min >= 0
        ):
            raise InvalidInput(
                f"list_fanout_min must be an integer >= 0 (or None: automatic), got {self.list_fanout_min!r}"
            )


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
    flagged: int = 0  # of those scanned: withheld (flagged, or unscorable and withheld): what --quarantine/--tag act on
    reported: int = 0  # of those scanned: released with the policy's `flag` action (reported, not withheld)
    errors: int = 0  # of those scanned: unscorable content (also counted in flagged) and read errors
    unscorable: int = 0  # of the errors: read but not scorable (withheld by the policy's unscorable_action)
    truncated: int = 0  # of those scanned: truncated files scored on what decodes
    sampled: int = 0  # of those scanned: more views than --max-views, frames sampled evenly over display time
    actions: ActionReport = field(default_factory=lambda: ActionReport(None, False))
    release: Any = None  # a release.ReleaseReport when --release was given
    overturned: int = 0  # flagged objects left alone because a reviewer overturned them
    listing_tasks: int = 0  # S3 prefix groups listed by parallel tasks (0: one paginator, or an inventory)
    unscorable_action: str = "block"  # the policy's action for unscorable objects (withheld unless allow or flag)

    @property
    def withheld(self) -> int:
        """Withheld objects (docs/CLI.md, Words): flagged + withheld unscorable, what the JSON's ``flagged`` counts."""
        return self.flagged

    @property
    def withheld_unscorable(self) -> int:
        return self.unscorable if self.unscorable_action in WITHHELD else 0

    @property
    def scored(self) -> int:
        """Of those scanned: read, decoded and given a verdict (neither unscorable nor a read error)."""
        return self.scanned - self.errors

    def as_json(self) -> dict[str, Any]:
        keys = ("scanned", "skipped_unchanged", "skipped_non_image", "skipped_symlinks", "flagged", "errors")
        out = {**{k: getattr(self, k) for k in keys}, "output": self.output}
        if self.release is not None:
            out["released"] = self.release.done if self.release.applied else 0
        return out


LISTING_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("last_modified", pa.timestamp("us", tz="UTC")),
        ("version_id", pa.string()),
    ]
)
LISTING_CHUNK = 100_000  # objects turned into one Arrow batch at a time (no Python object per listed key is kept)


def listing_table(objects: Iterable[ObjectInfo]) -> pa.Table:
    """Listed objects as columns (:data:`LISTING_SCHEMA`), built a chunk at a time."""
    batches = []
    it = iter(objects)
    while chunk := list(itertools.islice(it, LISTING_CHUNK)):
        cols = list(zip(*((o.key, o.etag, o.size, o.last_modified, o.version_id) for o in chunk), strict=True))
        batches.append(
            pa.RecordBatch.from_arrays(
                [pa.array(c, f.type) for c, f in zip(cols, LISTING_SCHEMA, strict=True)], schema=LISTING_SCHEMA
            )
        )
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA)


def excluded(keys: pa.ChunkedArray | pa.Array, exclude: list[str]) -> pa.ChunkedArray | pa.Array:
    """True where a key is under one of the ``exclude`` prefixes (DEST or the quarantine inside SOURCE)."""
    mask = pa.array([False] * len(keys), pa.bool_())
    for prefix in exclude:
        mask = pc.or_(mask, pc.starts_with(keys, prefix))
    return mask


def list_source(source: Location, exclude: list[str]) -> tuple[pa.Table, int]:
    """Every object under the source (:data:`LISTING_SCHEMA`, sorted by key), and the number of symlinks and other
    non-regular files a local source holds (never followed nor read)."""
    skipped: list[str] = []
    if isinstance(source.store, LocalStore):
        listing = source.store.list(source.prefix, skipped=skipped)
    else:
        listing = source.store.list(source.prefix)
    objects = listing_table(listing)
    if exclude and objects.num_rows:
        objects = objects.filter(pc.invert(excluded(objects["key"], exclude)))
    skipped = [k for k in skipped if not any(k.startswith(p) for p in exclude)]
    if skipped:
        log.warning("skipped %d symlinks or special files, never followed (e.g. %s)", len(skipped), skipped[0])
    return objects.sort_by("key"), len(skipped)


def named_image(key: str) -> bool:
    """Named like an image: read whole rather than sniffed first (the content still decides)."""
    return Path(key).suffix.lower() in IMAGE_SUFFIXES


_CURRENT = ("key", "etag", "size", "last_modified", "version_id", "model_fingerprint", "error_kind", "max_pixels")
_CURRENT += ("max_object_bytes", "unscorable")


def _seconds(ts: pa.ChunkedArray) -> pa.ChunkedArray:
    """Whole seconds since the epoch (``int(t.timestamp())``) of a microsecond timestamp column."""
    return pc.floor(pc.divide(pc.cast(pc.cast(ts, pa.timestamp("us", tz="UTC")), pa.int64()).cast(pa.float64()), 1e6))


def plan(objects: pa.Table, current: pa.Table, fingerprint: str, limits: DecodeLimits, full: bool):
    """Split the listing (:data:`LISTING_SCHEMA`) into objects to read and objects whose current row still holds,
    as one columnar join of the listing with the current view (no Python object per key).

    A row holds when it describes the listed version: etag and size, the modification time to the second (S3 sets
    it on every write; locally the etag holds it to the nanosecond, with ctime and inode), and the version id when
    the bucket lists one; then a recorded non-image stays one, and an image is read again only for a new model or
    policy, a read error, or an unscorable row from before unscorable verdicts or under other limits.

    Returns (todo as a listing table sorted by key, unchanged images, unchanged non-images)."""
    if full or current.num_rows == 0 or objects.num_rows == 0:
        return objects, 0, 0
    right = current.select(list(_CURRENT)).rename_columns(["key", *(f"c_{c}" for c in _CURRENT[1:])])
    joined = objects.join(right, keys="key", join_type="left outer", use_threads=True)
    true = pa.scalar(True)

    def known(mask):  # noqa: ANN001, ANN202 - a null comparison (no current row) counts as a difference
        return pc.fill_null(mask, False)

    same = pc.and_(known(pc.equal(joined["c_etag"], joined["etag"])), known(pc.equal(joined["c_size"], joined["size"])))
    same_time = pc.or_(
        pc.is_null(joined["c_last_modified"]),
        known(pc.equal(_seconds(joined["c_last_modified"]), _seconds(joined["last_modified"]))),
    )
    same_version_id = pc.or_(
        pc.is_null(joined["version_id"]), known(pc.equal(joined["c_version_id"], joined["version_id"]))
    )
    same = pc.and_(pc.and_(same, same_time), same_version_id)
    kind = joined["c_error_kind"]
    not_image = known(pc.equal(kind, NOT_IMAGE))
    rescore = pc.or_(
        pc.invert(known(pc.equal(joined["c_model_fingerprint"], fingerprint))), known(pc.equal(kind, "read"))
    )
    limits_moved = pc.or_(
        pc.invert(known(pc.equal(joined["c_max_pixels"], limits.max_pixels))),
        pc.invert(known(pc.equal(joined["c_max_object_bytes"], limits.max_bytes))),
    )
    unscorable_due = pc.and_(
        known(pc.equal(kind, "decode")), pc.or_(pc.invert(pc.fill_null(joined["c_unscorable"], False)), limits_moved)
    )
    holds_image = pc.and_(pc.and_(same, pc.invert(not_image)), pc.invert(pc.or_(rescore, unscorable_due)))
    others = pc.sum(pc.and_(same, not_image)).as_py() or 0
    unchanged = pc.sum(holds_image).as_py() or 0
    todo_mask = pc.invert(pc.or_(pc.and_(same, not_image), holds_image))
    todo = joined.filter(pc.equal(todo_mask, true)).select(LISTING_SCHEMA.names).sort_by("key")
    return todo, unchanged, others


def layout(cfg: ScanConfig) -> tuple[Location, Location, Location | None, list[str]]:
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
