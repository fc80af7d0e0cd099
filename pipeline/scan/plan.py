"""What a scan will do, decided without Ray: its configuration, the listing, and which objects to read.

Every object under SOURCE is a candidate, whatever its name (:func:`list_source`); :func:`plan` compares the listing
with DEST's current view (key, etag, size, modification time, version id, fingerprint, limits) and keeps only what
is new, changed or due again. :func:`layout` checks SOURCE, DEST and the quarantine against each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import InvalidInput
from ..images import IMAGE_SUFFIXES, DecodeLimits
from ..spec import CheckerSpec
from .actions import ActionReport, quarantine_location
from .state import NOT_IMAGE
from .storage import LocalStore, Location, ObjectInfo, S3Store, parse_location

log = logging.getLogger("diffguard")


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
    release: Any = None  # a release.ReleaseReport when --release was given
    overturned: int = 0  # flagged objects left alone because a reviewer overturned them

    def as_json(self) -> dict[str, Any]:
        keys = ("scanned", "skipped_unchanged", "skipped_non_image", "skipped_symlinks", "flagged", "errors")
        out = {**{k: getattr(self, k) for k in keys}, "output": self.output}
        if self.release is not None:
            out["released"] = self.release.done if self.release.applied else 0
        return out


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
