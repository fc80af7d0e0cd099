"""One small interface over object storage: S3 (AWS or any S3-compatible store) and local directories.

A location is ``s3://bucket/prefix`` or a local directory. A :class:`Store` lists objects with an etag, size and
modification time, reads them, writes atomically (readers see the whole object or nothing), copies, deletes only the
version it was told about, and tags. Stores pickle (boto3 clients are created lazily in each process), so Ray tasks
take them as arguments. Credentials come only from boto3's standard chain.

For local directories the etag is ``<size>-<mtime_ns>-<ctime_ns>-<inode>`` in hex: cheap to list (no file is read to
list it) and it changes whenever a file is rewritten, even at the same size with its old mtime restored (``os.utime``
moves the ctime, which no unprivileged call can set back) or replaced by another file renamed over it (a new inode);
a ``touch`` or ``chmod`` alone also changes it, which only costs a rescore. Symbolic links and other non-regular files
are never followed nor read: :meth:`LocalStore.list` reports them through ``skipped``.

Every read can be pinned to one version (:class:`Version`): S3 reads by ``VersionId`` where the bucket keeps versions,
else with ``If-Match`` on the ETag; a local read compares the etag of the open file before and after reading. A read
of anything else raises :class:`ObjectChanged`, so what a reviewer is shown, or an action copies, is the version the
scan scored and never a replacement written since.

No write here ever replaces another object: :meth:`Store.create` writes exclusively (a hard link of a complete temp
file locally, which fails if the name exists; ``If-None-Match: *`` on S3) and is what copies use. Only the scan's own
results (:meth:`Store.write`) are replaced in place.

long: the interface and its two implementations side by side (about 570 lines), so that their shared contracts
(exclusive create, etag-guarded delete, the exact version read) are read and changed together.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import InvalidInput, ObjectChanged, ObjectExists, StorageError

log = logging.getLogger(__name__)

S3_RETRIES = {"mode": "standard", "max_attempts": 8}  # botocore: throttling, 5xx and connection errors, with backoff
BODY_ATTEMPTS = 4  # GETs whose body breaks off mid-stream (botocore's retries end when the headers arrive)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root (S3: the full object key)
    etag: str  # S3: the ETag without quotes; local: "<size>-<mtime_ns>-<ctime_ns>-<inode>" in hex
    size: int  # bytes
    last_modified: datetime  # UTC (S3: set by the server on every write; a client cannot set it back)
    version_id: str | None = None  # S3 VersionId in a versioned bucket (a new one on every write); else None


@dataclass(frozen=True)
class Version:
    """One version of an object: what a read is pinned to. :class:`ObjectInfo` and a scan row's ``etag`` and
    ``version_id`` are versions too."""

    etag: str | None
    version_id: str | None = None  # S3 VersionId in a versioned bucket: pins the version even where ETags repeat

    @classmethod
    def of(cls, row: dict[str, Any]) -> Version:
        return cls(row.get("etag"), row.get("version_id"))


def _pinned(url: str, info: ObjectInfo, version: Version | ObjectInfo | None) -> ObjectInfo:
    """``info`` when it is the version asked for (or none was), else :class:`ObjectChanged`."""
    if version is not None and version.etag is not None and info.etag != version.etag:
        raise ObjectChanged(f"{url} changed since it was scanned (etag {info.etag}, expected {version.etag})")
    return info


class Store(ABC):
    """Objects under one root: an S3 bucket or a local directory. Keys are '/'-separated and relative to the root."""

    @abstractmethod
    def url(self, key: str = "") -> str: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (folder markers excluded), in key order for S3, walk order locally."""

    @abstractmethod
    def read(self, key: str, version: Version | ObjectInfo | None = None) -> tuple[bytes, ObjectInfo]:
        """The bytes and the etag/size/mtime of exactly the version read. ``version`` pins the read to that version
        (S3: its VersionId when it has one, else If-Match on its etag): another one raises :class:`ObjectChanged`."""

    @abstractmethod
    def read_prefix(self, key: str, n: int) -> tuple[bytes, ObjectInfo]:
        """At most the first ``n`` bytes (a ranged read on S3) and the etag/size/mtime of the version read."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def create(self, key: str, data: bytes) -> None:
        """Write a new object, whole or not at all, and never over an existing one: raises :class:`ObjectExists`."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Atomic: a reader sees the previous object, or the whole new one."""

    @abstractmethod
    def delete(self, key: str, etag: str | None = None) -> None:
        """Delete (only the version with ``etag`` when given: raises :class:`StorageError` if it changed)."""

    def copy(self, key: str, dst: Store, dst_key: str, etag: str) -> None:
        """Copy the version ``etag`` of ``key`` to ``dst``/``dst_key`` (raises if the source changed)."""
        data, _ = self.read(key, Version(etag))
        dst.create(dst_key, data)

    def versioned(self) -> bool:
        """True when the store keeps every version of an object under its own id (an S3 bucket with versioning)."""
        return False

    def tag(self, key: str, tags: dict[str, str], etag: str) -> None:
        raise InvalidInput(f"{self.url()} does not support object tags (use an S3 source, or --quarantine)")

    def untag(self, key: str, tags: dict[str, str], etag: str) -> None:
        """Remove ``tags`` (each only while it still has the value given); the object's other tags are kept."""
        raise InvalidInput(f"{self.url()} does not support object tags: there are none to remove")

    def access_hint(self) -> str:
        """Where credentials come from (for error messages)."""
        return "local filesystem permissions"

    def tidy(self, prefix: str = "") -> None:
        """Remove what crashed writes left behind under ``prefix`` (nothing to do for S3: a PUT is all or nothing)."""
        return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- local directories ------------------------------------------------------------------------------------------------
def canonical_key(key: str) -> bool:
    """True when ``key`` names one path exactly: '/'-separated non-empty segments, none '.' or '..', no NUL."""
    parts = key.split("/")
    return bool(key) and "\0" not in key and all(p not in ("", ".", "..") for p in parts)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a file name with bytes that are not UTF-8 (surrogate escapes)
        return False
    return True


@dataclass(frozen=True)
class LocalStore(Store):
    root: str  # absolute directory path

    def url(self, key: str = "") -> str:
        return str(Path(self.root, key)) if key else self.root

    def _path(self, key: str) -> Path:
        """The file a key names. Keys that a path would normalise into another key's ('a//b', './c', 'd/', '..',
        NUL) are refused, so two keys never share a file."""
        if not canonical_key(key):
            raise InvalidInput(
                f"key {key!r} does not name one path under {self.root} (empty, '.', '..' or NUL segment)"
            )
        return Path(self.root, key)

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        etag = f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}-{st.st_ino:x}"
        return ObjectInfo(key, etag, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix: str = "", skipped: list[str] | None = None) -> Iterator[ObjectInfo]:
        """Regular files only, never through a symbolic link; the keys of symlinks and special files (FIFOs, devices,
        sockets), and of folders that cannot be listed, are appended to ``skipped`` (they are never followed)."""
        base = Path(self.root, prefix)
        if base.is_symlink() or not base.is_dir():
            return
        stack = [base]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                log.warning("cannot list %s: %s (skipped)", folder, exc.strerror or exc)
                if skipped is not None:
                    skipped.append(folder.relative_to(self.root).as_posix() + "/")
                continue
            subdirs = []
            for entry in entries:
                key = Path(entry.path).relative_to(self.root).as_posix()
                if not _utf8(key):
                    log.warning("skipping %r: its name is not UTF-8", key)
                    if skipped is not None:
                        skipped.append(key.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while listing
                except OSError as exc:
                    log.warning("cannot inspect %s: %s (skipped)", entry.path, exc.strerror or exc)
                    if skipped is not None:
                        skipped.append(key)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(Path(entry.path))
                elif stat.S_ISREG(st.st_mode):
                    if not entry.name.startswith(".diffguard-tmp-"):  # our own half-written files
                        yield self._info(key, st)
                elif skipped is not None:
                    skipped.append(key)  # a symlink (never followed), FIFO, socket or device
            stack.extend(reversed(subdirs))

    def _open(self, key: str) -> int:
        """A descriptor of the regular file ``key`` names, never through a symlink at the last component."""
        fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        return fd

    def read(self, key: str, version: Version | ObjectInfo | None = None) -> tuple[bytes, ObjectInfo]:
        return self._read(key, -1, version)

    def read_prefix(self, key: str, n: int) -> tuple[bytes, ObjectInfo]:
        return self._read(key, n, None)

    def _read(self, key: str, n: int, version: Version | ObjectInfo | None) -> tuple[bytes, ObjectInfo]:
        """The open file's etag before and after the read must agree (a write in between changes its mtime and ctime),
        and equal ``version``'s when given."""
        try:
            with os.fdopen(self._open(key), "rb") as f:
                before = self._info(key, os.fstat(f.fileno()))
                _pinned(self.url(key), before, version)  # nothing is read from another version
                data = f.read(n)
                after = self._info(key, os.fstat(f.fileno()))
        except OSError as exc:
            raise StorageError(f"cannot read {self.url(key)}: {exc.strerror or exc}") from None
        if after.etag != before.etag:
            raise ObjectChanged(f"{self.url(key)} changed while it was read (etag {before.etag}, then {after.etag})")
        return data, after

    def head(self, key: str) -> ObjectInfo | None:
        try:
            return self._info(key, os.stat(self._path(key), follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _temp(self, path: Path, data: bytes) -> str:
        """A complete, synced temp file beside ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".diffguard-tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    @staticmethod
    def _sync_dir(folder: Path) -> None:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename or link itself survives a crash
        finally:
            os.close(dir_fd)

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._sync_dir(path.parent)

    def create(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            tmp = self._temp(path, data)
        except (FileExistsError, NotADirectoryError) as exc:  # a parent folder's name is a file: another object's
            raise ObjectExists(f"cannot create {path}: {exc.strerror or exc}; not overwritten") from None
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
        try:
            os.link(tmp, path)  # whole (the temp file is complete) and exclusive (link never replaces a name)
        except FileExistsError:
            raise ObjectExists(f"{path} already exists; not overwritten") from None
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._sync_dir(path.parent)

    def tidy(self, prefix: str = "") -> None:
        base = Path(self.root, prefix)
        for dirpath, _, filenames in os.walk(base, topdown=False):
            for name in filenames:
                if name.startswith(".diffguard-tmp-"):
                    Path(dirpath, name).unlink(missing_ok=True)
            if Path(dirpath) != base and not os.listdir(dirpath):
                os.rmdir(dirpath)

    def delete(self, key: str, etag: str | None = None) -> None:
        path = self._path(key)
        if etag is not None:
            current = self.head(key)
            if current is not None and current.etag != etag:
                raise StorageError(f"{path} changed since it was scanned; not deleted")
        path.unlink(missing_ok=True)


# --- S3 ---------------------------------------------------------------------------------------------------------------
_CLIENTS: dict[str | None, Any] = {}  # endpoint -> boto3 client, one per process
_CLIENTS_LOCK = threading.Lock()


def _s3_client(endpoint_url: str | None) -> Any:
    """One boto3 S3 client per endpoint and process, shared by every store and thread: clients are thread-safe
    (sessions are not), and creating one costs ~0.2 s of CPU (service model, endpoint rules). A client per reading
    thread, paid again on every scan batch, was the scan's largest cost."""
    with _CLIENTS_LOCK:
        if endpoint_url not in _CLIENTS:
            import boto3
            from botocore.config import Config

            config = Config(retries=S3_RETRIES, connect_timeout=10, read_timeout=60, max_pool_connections=32)
            _CLIENTS[endpoint_url] = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        return _CLIENTS[endpoint_url]


@dataclass(frozen=True)
class S3Store(Store):
    bucket: str
    endpoint_url: str | None = None  # None: AWS (or $AWS_ENDPOINT_URL, which boto3 reads itself)

    @property
    def client(self) -> Any:
        return _s3_client(self.endpoint_url)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def access_hint(self) -> str:
        import boto3

        session = boto3.session.Session()
        creds = session.get_credentials()
        where = f"endpoint {self.endpoint_url or session.client('s3').meta.endpoint_url}"
        if creds is None:
            return (
                f"no credentials found by boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"AWS_PROFILE and ~/.aws, web identity, instance or pod role); {where}"
            )
        profile = f", profile {session.profile_name!r}" if session.profile_name != "default" else ""
        return f"credentials from boto3's {creds.method!r} provider{profile}; {where}"

    def _error(self, action: str, key: str, exc: Exception) -> StorageError:
        response = getattr(exc, "response", None) or {}  # some botocore errors carry response=None
        code = response.get("Error", {}).get("Code")
        reason = f"{code}: {exc}" if code else f"{type(exc).__name__}: {exc}"
        return StorageError(f"cannot {action} {self.url(key)}: {reason}")

    @staticmethod
    def _info(key: str, etag: str, size: int, modified: datetime, version_id: str | None = None) -> ObjectInfo:
        return ObjectInfo(key, etag.strip('"'), int(size), modified.astimezone(UTC), version_id)

    def versioned(self) -> bool:
        """True when the bucket keeps versions (every write then gets a new VersionId). A store that does not know
        versioning, or a caller without s3:GetBucketVersioning, counts as unversioned."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            status = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
        except (BotoCoreError, ClientError) as exc:
            log.debug("versioning of %s unknown (%s): listing without version ids", self.url(), exc)
            return False
        return status in ("Enabled", "Suspended")

    def _pages(
        self, prefix: str, versions: bool, delimiter: str | None = None, start_after: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The raw pages of one listing: ListObjectVersions in a versioned bucket, else ListObjectsV2."""
        kwargs = {"Bucket": self.bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        if start_after:  # keys after this one only
            kwargs["KeyMarker" if versions else "StartAfter"] = start_after
        yield from self.client.get_paginator("list_object_versions" if versions else "list_objects_v2").paginate(
            **kwargs
        )

    def _objects(self, page: dict[str, Any], versions: bool) -> Iterator[ObjectInfo]:
        """A page's objects: latest versions only (delete markers are never listed as objects), no folder markers."""
        entries = (v for v in page.get("Versions", []) if v.get("IsLatest")) if versions else page.get("Contents", [])
        for obj in entries:
            if obj["Key"].endswith("/") and obj["Size"] == 0:
                continue  # folder marker written by consoles and sync tools
            yield self._info(obj["Key"], obj["ETag"], obj["Size"], obj["LastModified"], obj.get("VersionId"))

    def list(
        self, prefix: str = "", versions: bool | None = None, start_after: str | None = None
    ) -> Iterator[ObjectInfo]:
        """Every object, with its VersionId when the bucket is versioned (ListObjectVersions, latest versions only).
        ``versions``: whether the bucket is versioned, when the caller already asked (:meth:`versioned`);
        ``start_after``: only the keys after this one, in key order."""
        from botocore.exceptions import BotoCoreError, ClientError

        versions = self.versioned() if versions is None else versions
        try:
            for page in self._pages(prefix, versions, start_after=start_after):
                yield from self._objects(page, versions)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"{self._error('list', prefix, exc)} ({self.access_hint()})") from None

    def list_level(self, prefix: str, versions: bool) -> tuple[list[ObjectInfo], list[str]]:
        """One level of the key tree under ``prefix`` (a ``Delimiter="/"`` listing): the objects directly at it and
        its sub-prefixes (each ending in '/'). Every key under ``prefix`` is one of the objects (or a folder marker),
        or lies under exactly one of the sub-prefixes."""
        from botocore.exceptions import BotoCoreError, ClientError

        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        try:
            for page in self._pages(prefix, versions, delimiter="/"):
                objects.extend(self._objects(page, versions))
                prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"{self._error('list', prefix, exc)} ({self.access_hint()})") from None
        return objects, prefixes

    def read(self, key: str, version: Version | ObjectInfo | None = None) -> tuple[bytes, ObjectInfo]:
        return self._get(key, None, version)

    def read_prefix(self, key: str, n: int) -> tuple[bytes, ObjectInfo]:
        if n == 0:
            info = self.head(key)
            if info is None:
                raise StorageError(f"cannot read {self.url(key)}: NoSuchKey")
            return b"", info
        return self._get(key, n)

    def _get(self, key: str, n: int | None, version: Version | ObjectInfo | None = None) -> tuple[bytes, ObjectInfo]:
        from botocore import exceptions as e

        broken_body = (e.IncompleteReadError, e.ReadTimeoutError, e.ResponseStreamingError)
        ranged = {"Range": f"bytes=0-{n - 1}"} if n is not None and n > 0 else {}
        pin: dict[str, str] = {}
        if version is not None and version.version_id:
            pin = {"VersionId": version.version_id}  # that version, whatever was written since
        elif version is not None and version.etag:
            pin = {"IfMatch": f'"{version.etag}"'}  # 412 unless the object still has that ETag
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key, **ranged, **pin)
                data = resp["Body"].read()
            except broken_body as exc:
                if attempt < BODY_ATTEMPTS:  # the body broke off mid-stream: botocore retries only the request
                    continue
                raise self._error("read", key, exc) from None
            except e.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if ranged and code == "InvalidRange":
                    ranged = {}  # an empty object: no byte 0 to range over
                    continue
                if pin and code in ("PreconditionFailed", "412", "NoSuchVersion", "NoSuchKey", "InvalidArgument"):
                    raise ObjectChanged(f"{self.url(key)} changed since it was scanned ({code}): not read") from None
                raise self._error("read", key, exc) from None
            except e.BotoCoreError as exc:
                raise self._error("read", key, exc) from None
            size = resp["ContentLength"]
            if ranged and (total := resp.get("ContentRange", "").rpartition("/")[2]).isdigit():
                size = int(total)  # "bytes 0-65535/1048576": the whole object's size
            info = self._info(key, resp["ETag"], size, resp["LastModified"], resp.get("VersionId"))
            return data, _pinned(self.url(key), info, version)
        raise AssertionError("unreachable")

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error("inspect", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("inspect", key, exc) from None
        return self._info(key, resp["ETag"], resp["ContentLength"], resp["LastModified"], resp.get("VersionId"))

    def write(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # a single PUT is atomic in S3: the object appears whole or not at all
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("write", key, exc) from None

    def delete(self, key: str, etag: str | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if etag is not None:
            current = self.head(key)
            if current is None:
                return
            if current.etag != etag:
                raise StorageError(f"{self.url(key)} changed since it was scanned; not deleted")
        try:
            kwargs = {"IfMatch": f'"{etag}"'} if etag else {}
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key, **kwargs)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if kwargs and code in ("NoSuchKey", "404"):
                    return  # already gone: e.g. an earlier attempt landed and its answer was lost (botocore retried)
                if not kwargs or code not in ("NotImplemented", "InvalidArgument"):
                    raise
                self.client.delete_object(Bucket=self.bucket, Key=key)  # stores without conditional deletes
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", key, exc) from None

    def create(self, key: str, data: bytes) -> None:
        """A conditional PUT (``If-None-Match: *``): S3 refuses it with 412 when the key exists. Copies go through it
        too, rather than a server-side CopyObject: not every S3 API honours If-None-Match on a copy (moto ignores it
        and overwrites), and a HEAD before the write would leave a window for another writer."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise ObjectExists(f"{self.url(key)} already exists; not overwritten") from None
            if code in ("NotImplemented", "501"):
                raise StorageError(
                    f"{self.url()} does not support conditional writes (If-None-Match), so a write could replace "
                    f"another object; refusing to write {key!r}: quarantine to a local directory or another store"
                ) from None
            raise self._error("write", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("write", key, exc) from None

    def tag(self, key: str, tags: dict[str, str], etag: str) -> None:
        """Merge ``tags`` into the object's tag set (S3 replaces the whole set, so read it first)."""
        from botocore.exceptions import BotoCoreError, ClientError

        current = self.head(key)
        if current is None or current.etag != etag:
            raise StorageError(f"{self.url(key)} changed since it was scanned; not tagged")
        try:
            existing = self.client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
            merged = {t["Key"]: t["Value"] for t in existing} | tags
            tag_set = [{"Key": k, "Value": v} for k, v in sorted(merged.items())]
            self.client.put_object_tagging(Bucket=self.bucket, Key=key, Tagging={"TagSet": tag_set})
        except (BotoCoreError, ClientError) as exc:
            raise self._error("tag", key, exc) from None

    def untag(self, key: str, tags: dict[str, str], etag: str) -> None:
        """Remove ``tags`` (each only while it still has the value given) from the object's tag set; others are kept."""
        from botocore.exceptions import BotoCoreError, ClientError

        current = self.head(key)
        if current is None or current.etag != etag:
            raise StorageError(f"{self.url(key)} changed since it was scanned; not untagged")
        try:
            existing = self.client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
            kept = [t for t in existing if tags.get(t["Key"]) != t["Value"]]
            if len(kept) == len(existing):
                return
            if kept:
                self.client.put_object_tagging(Bucket=self.bucket, Key=key, Tagging={"TagSet": kept})
            else:
                self.client.delete_object_tagging(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("untag", key, exc) from None


# --- locations --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Location:
    """A store and a key prefix inside it ("" or ending in '/')."""

    store: Store
    prefix: str = ""

    def __str__(self) -> str:
        return self.store.url(self.prefix)

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def within(self, other: Location) -> str | None:
        """The key prefix, in ``other``'s key space, under which this location lies; None when it is elsewhere."""
        if isinstance(self.store, S3Store) and isinstance(other.store, S3Store):
            same = (self.store.bucket, self.store.endpoint_url) == (other.store.bucket, other.store.endpoint_url)
            return self.prefix if same and self.prefix.startswith(other.prefix) else None
        if isinstance(self.store, LocalStore) and isinstance(other.store, LocalStore):
            mine, theirs = Path(self.store.root, self.prefix), Path(other.store.root, other.prefix)
            if mine == theirs or theirs in mine.parents:
                rel = mine.relative_to(other.store.root).as_posix()
                return "" if rel == "." else rel + "/"
        return None

    def holds(self, url: str) -> str | None:
        """The key in this location's store of the object ``url`` names (``s3://bucket/key`` or an absolute path) when
        it lies inside this location, else None. What a journal or a row under DEST names is acted on only through
        this: DEST's writers can name paths, not widen what a scan may touch."""
        if isinstance(self.store, S3Store):
            bucket, _, key = url.removeprefix("s3://").partition("/") if url.startswith("s3://") else ("", "", "")
            return key if bucket == self.store.bucket and key.startswith(self.prefix) and key != self.prefix else None
        if isinstance(self.store, LocalStore) and os.path.isabs(url) and os.path.normpath(url) == url:
            base = Path(self.store.root, self.prefix)
            if base in Path(url).parents:
                key = Path(url).relative_to(self.store.root).as_posix()
                return key if canonical_key(key) else None
        return None


def parse_location(text: str, endpoint_url: str | None = None, what: str = "location") -> Location:
    """``s3://bucket/prefix`` or a local directory path -> :class:`Location`."""
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise InvalidInput(f"{what} {text!r} has no bucket: expected s3://bucket/prefix")
        prefix = prefix.strip("/")
        return Location(S3Store(bucket, endpoint_url), prefix + "/" if prefix else "")
    if "://" in text:
        raise InvalidInput(f"{what} {text!r}: expected s3://bucket/prefix or a local directory")
    return Location(LocalStore(str(Path(text).expanduser().resolve())))


def object_store(url: str, endpoint_url: str | None) -> tuple[Store, str]:
    """The store and key of an object URL: ``s3://bucket/key``, or an absolute path."""
    if url.startswith("s3://"):
        bucket, _, key = url[5:].partition("/")
        return S3Store(bucket, endpoint_url), key
    path = Path(url)
    return LocalStore(str(path.parent)), path.name


def locate(row: dict[str, Any], endpoint_url: str | None) -> tuple[Store, str]:
    """(store, key) of a scan row's object where it is now: its quarantine copy once moved (``quarantined_to``), else
    its place in the source (``bucket``, ``key``)."""
    if row.get("quarantined_to"):
        return object_store(row["quarantined_to"], endpoint_url)
    if row["bucket"].startswith("/"):  # a local scan's rows name the absolute source directory
        return LocalStore(row["bucket"]), row["key"]
    return S3Store(row["bucket"], endpoint_url), row["key"]
