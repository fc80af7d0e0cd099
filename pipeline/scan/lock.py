"""One scan per DEST at a time: the lock object ``DEST/_lock.json``.

Two scans on one DEST would take the same run number and write over each other's parts and commits, so
:func:`pipeline.scan.run_scan` holds this lock for the whole run. It is claimed with an exclusive create
(:meth:`Store.create`: a hard link locally, ``If-None-Match: *`` on S3), so of two scans exactly one gets it; the
other raises :class:`DestBusy` naming the holder (the CLI exits 2). The lock holds a unique run id (uuid4 hex), the run
number (claimed once the lock is held: :meth:`DestLock.claim`), who and where (user, host, pid) and when (started_at,
heartbeat_at, UTC). The holder rewrites ``heartbeat_at`` every :data:`LOCK_HEARTBEAT_S` from a daemon thread and
deletes the lock when the run ends, only while it still holds its run id.

A lock left by a killed scan is taken over, with a WARNING naming the old holder, when its heartbeat is older than
:data:`LOCK_STALE_S`, at once when its process is gone (the same host, boot and pid namespace: ``kill -0``), or when
the user says so (``--break-lock``, ``ScanConfig(break_lock=True)``). Taking over deletes the old lock only while it is
still the version read (an etag-guarded delete), then creates a new one exclusively: of two scans taking over, one
wins and the other is told the DEST is busy.

The races that remain, documented rather than hidden: a heartbeat re-reads the lock, then rewrites it, so a takeover
landing between the two is overwritten (the taker finds a foreign run id at its own next heartbeat, or before it
commits, and stops); and a local etag-guarded delete compares, then unlinks. Both need a holder silent for
:data:`LOCK_STALE_S` or a ``--break-lock`` of a live scan, and a run that no longer holds its lock refuses to commit
(:meth:`DestLock.check`).

>>> with DestLock.acquire(dest) as lock:   # DestBusy when another scan holds DEST
...     run = lock.claim(load_meta(dest).last_run + 1)
...     lock.check()                        # before the commit: still ours
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import DestBusy, ObjectExists, StorageError
from ..storage import Location, ObjectInfo

log = logging.getLogger("diffguard")

LOCK = "_lock.json"  # under DEST
LOCK_HEARTBEAT_S = 60.0  # the holder rewrites heartbeat_at this often
LOCK_STALE_S = 600.0  # a lock without a heartbeat for this long is taken over
ATTEMPTS = 4  # create / take over rounds before giving up (each lost to another scan that took the lock meanwhile)

_HELD: set[str] = set()  # run ids held by this process: a lock naming this pid and none of them is a dead one's


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: Any) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid{os.getuid()}"


def _machine() -> str | None:
    """This boot and pid namespace: pids of two lock holders are comparable only when these are equal."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """What ``DEST/_lock.json`` says: the scan holding DEST."""

    run_id: str  # uuid4 hex, unique per run (also in the run's Delta commit: diffguard.run_id)
    run: int | None  # the run number, once claimed
    user: str
    host: str
    pid: int
    started_at: str  # UTC, 2026-12-05T09:00:00Z
    heartbeat_at: str  # UTC, rewritten every LOCK_HEARTBEAT_S
    machine: str | None = None  # boot id / pid namespace (Linux), for telling a dead holder on this host

    @classmethod
    def new(cls) -> Holder:
        now = _stamp(_now())
        return cls(uuid.uuid4().hex, None, _user(), socket.gethostname(), os.getpid(), now, now, _machine())

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """None when the bytes are not a lock this version can read."""
        try:
            fields = json.loads(raw)
            return cls(**{k: fields.get(k) for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError):
            return None

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    def describe(self) -> str:
        run = f"run {self.run}" if self.run else "a run starting"
        beat = self.heartbeat_at or "?"
        if beat[:10] == (self.started_at or "")[:10]:
            beat = beat[11:]  # the same day: the time is enough
        return (
            f"{run} (id {str(self.run_id)[:8]}…) by {self.user}@{self.host} pid {self.pid} "
            f"since {self.started_at}, last heartbeat {beat}"
        )

    def gone(self) -> bool:
        """True when the holder ran on this host, boot and pid namespace and its process no longer exists."""
        if self.machine is None or self.machine != _machine() or self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return self.run_id not in _HELD  # this pid before (a restarted container), not a run of this process
        try:
            os.kill(int(self.pid), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError, TypeError):  # alive under another user, or no pid to check
            return False
        return False


def _read(dest: Location) -> tuple[Holder | None, ObjectInfo] | None:
    """The lock and the version read; None when there is none."""
    key = dest.key(LOCK)
    if dest.store.head(key) is None:
        return None
    try:
        raw, info = dest.store.read(key)
    except StorageError:
        if dest.store.head(key) is None:
            return None  # released meanwhile
        raise
    return Holder.parse(raw), info


def _why_take(holder: Holder | None, info: ObjectInfo, forced: bool, stale_s: float) -> str | None:
    """Why the lock found may be taken over (None: it is held)."""
    if forced:
        return "--break-lock"
    beat = _parse(holder.heartbeat_at) if holder is not None else None
    age = (_now() - (beat or info.last_modified)).total_seconds()
    if age > stale_s:
        return f"no heartbeat for {age / 60:.0f} minutes (stale after {stale_s / 60:g})"
    if holder is not None and holder.gone():
        return f"its process {holder.pid} on this host is gone"
    return None


def busy_message(dest: Location, holder: Holder | None, stale_s: float = LOCK_STALE_S) -> str:
    who = holder.describe() if holder is not None else f"an unreadable lock {dest.store.url(dest.key(LOCK))}"
    return (
        f"DEST {dest} is busy: {who}; wait for it, or if that scan is dead rerun with --break-lock "
        f"(ScanConfig(break_lock=True); a lock without a heartbeat for {stale_s / 60:g} minutes is taken over)"
    )


class DestLock:
    """The lock this run holds on DEST: acquired exclusively, kept alive by a heartbeat thread, released at the end.

    >>> with DestLock.acquire(dest, break_lock=False) as lock:
    ...     lock.claim(8)        # the run number, written into the lock
    """

    def __init__(self, dest: Location, holder: Holder, heartbeat_s: float):
        self.dest, self.holder = dest, holder
        self._mutex, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="diffguard-lock", daemon=True)

    @property
    def run_id(self) -> str:
        return self.holder.run_id

    @classmethod
    def acquire(
        cls,
        dest: Location,
        break_lock: bool = False,
        heartbeat_s: float = LOCK_HEARTBEAT_S,
        stale_s: float = LOCK_STALE_S,
        wait_s: float = 0.0,
        poll_s: float = LOCK_HEARTBEAT_S / 2,
    ) -> DestLock:
        """Claim DEST's lock, taking over a stale one, a dead holder's, or (``break_lock``) the one found first.
        Raises :class:`DestBusy` when another scan holds it, after ``wait_s`` seconds of trying again every
        ``poll_s`` (a retry of a scan whose cluster died waits for its lock to go stale, then resumes)."""
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                return cls._acquire(dest, break_lock, heartbeat_s, stale_s)
            except DestBusy as busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if not said:
                    log.warning("WARNING: %s; waiting up to %.0f s for it to end or go stale", busy, left)
                    said = True
                time.sleep(min(poll_s, left))

    @classmethod
    def _acquire(cls, dest: Location, break_lock: bool, heartbeat_s: float, stale_s: float) -> DestLock:
        mine, key, store = Holder.new(), dest.key(LOCK), dest.store
        forced: str | None = None  # the run id of the lock --break-lock breaks: only the one found first
        found = None
        for attempt in range(ATTEMPTS):
            try:
                store.create(key, mine.encode())
                break
            except ObjectExists:
                pass
            found = _read(dest)
            if found is None:
                continue  # released meanwhile: create again
            holder, info = found
            if holder is not None and holder.run_id == mine.run_id:
                break  # our own create, retried after its answer was lost
            if break_lock and attempt == 0:
                forced = holder.run_id if holder is not None else info.etag
            ident = holder.run_id if holder is not None else info.etag
            why = _why_take(holder, info, forced is not None and ident == forced, stale_s)
            if why is None:
                raise DestBusy(busy_message(dest, holder, stale_s))
            who = holder.describe() if holder is not None else "an unreadable lock"
            log.warning("WARNING: DEST %s: taking over the lock of %s (%s)", dest, who, why)
            try:
                store.delete(key, etag=info.etag)  # only the lock read: another scan's new one stays
            except StorageError:
                again = _read(dest)
                if again is not None and again[1].etag == info.etag:
                    raise  # not a race: the store refused the delete
                continue  # replaced meanwhile: look again
        else:
            raise DestBusy(busy_message(dest, found[0] if found else None, stale_s))
        lock = cls(dest, mine, heartbeat_s)
        _HELD.add(mine.run_id)
        lock._thread.start()
        log.info("DEST %s locked for this run (id %s)", dest, mine.run_id)
        return lock

    def __enter__(self) -> DestLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _ours(self) -> tuple[bool, Holder | None, ObjectInfo | None]:
        found = _read(self.dest)
        if found is None:
            return False, None, None
        holder, info = found
        return holder is not None and holder.run_id == self.run_id, holder, info

    def _rewrite(self, **changes: Any) -> bool:
        """Re-read the lock, and rewrite it with ``changes`` only if it still holds our run id."""
        with self._mutex:
            ours, holder, _ = self._ours()
            if not ours:
                theirs = holder.describe() if holder is not None else "no lock at all"
                log.error(
                    "ERROR: DEST %s: this run (id %s) no longer holds its lock: it now names %s. Another scan took "
                    "DEST over (--break-lock, or no heartbeat for %g minutes): this run will not commit",
                    self.dest,
                    self.run_id,
                    theirs,
                    LOCK_STALE_S / 60,
                )
                return False
            self.holder = replace(self.holder, **changes)
            self.dest.store.write(self.dest.key(LOCK), self.holder.encode())  # the race: see the module docstring
            return True

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if not self._rewrite(heartbeat_at=_stamp(_now())):
                    return  # lost: logged loudly; the run fails before it commits (check)
            except (StorageError, OSError) as exc:  # a transient failure: the next beat tries again
                log.warning("WARNING: DEST %s: cannot refresh the lock's heartbeat: %s", self.dest, exc)

    def claim(self, run: int) -> int:
        """Record the run number (taken from DEST while holding the lock) in the lock; returns it."""
        if not self._rewrite(run=run, heartbeat_at=_stamp(_now())):
            raise StorageError(f"DEST {self.dest}: lost the lock before run {run} started (see the error above)")
        return run

    def check(self) -> None:
        """Raise :class:`StorageError` unless the lock still holds this run's id (called before committing)."""
        with self._mutex:
            ours, holder, _ = self._ours()
        if not ours:
            theirs = holder.describe() if holder is not None else "no lock"
            raise StorageError(
                f"DEST {self.dest}: run {self.holder.run} (id {self.run_id}) lost its lock to {theirs}; not committed"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, only while it still holds our run id (and is the version read)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        _HELD.discard(self.run_id)
        try:
            with self._mutex:
                ours, holder, info = self._ours()
                if ours and info is not None:
                    self.dest.store.delete(self.dest.key(LOCK), etag=info.etag)
                    log.debug("DEST %s unlocked (id %s)", self.dest, self.run_id)
                    return
        except StorageError as exc:
            log.warning(
                "WARNING: DEST %s: cannot remove this run's lock (%s): the next scan takes it over after %g minutes "
                "without a heartbeat, or at once with --break-lock",
                self.dest,
                exc,
                LOCK_STALE_S / 60,
            )
            return
        if holder is not None:
            log.error("ERROR: DEST %s: the lock now names %s, not this run: left alone", self.dest, holder.describe())
