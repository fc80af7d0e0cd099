"""Group commit: many concurrent ``record`` calls become one Delta append, written by one background thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from typing import Any

from ..errors import AuditUnavailable
from ..storage import Location
from .rows import conform, to_table
from .table import append, compact, location

log = logging.getLogger(__name__)

REOPEN_S = 300.0  # the writer reloads the table (and fresh S3 credentials) at least this often
COMPACT_EVERY = 100  # groups between compactions: an append's cost grows with the table's file count (~0.1 ms/file)


class AuditLog:
    """Durable audit rows in the Delta table at ``DEST/audit``, appended in groups.

    ``record`` returns once its row is committed; rows that arrive while a group waits (``max_delay_s`` after its
    first row, or until ``max_rows``) or while the previous group commits are written together: one data file and one
    log commit per group. A group whose write fails (after :mod:`pipeline.audit.table`'s bounded retries) raises
    :class:`~pipeline.errors.AuditUnavailable` in every one of its callers. ``groups``, ``rows`` and
    ``failed_groups`` count what was written. Every ``compact_every`` groups a second thread compacts the table
    (delta-rs's append reads every file's entry: 300 small files take an append from 7 to 40 ms); 0 never does.

    >>> audit = AuditLog("s3://bucket/audit", replica="ingress-1")
    >>> await audit.record({"time": datetime.now(UTC), "request_id": "r1", ...})  # the keys: pipeline.audit
    >>> audit.close()
    """

    def __init__(
        self,
        dest: str | Location,
        *,
        max_delay_s: float = 0.005,
        max_rows: int = 1024,
        replica: str = "",
        endpoint_url: str | None = None,
        compact_every: int = COMPACT_EVERY,
    ):
        if isinstance(max_delay_s, bool) or not isinstance(max_delay_s, int | float) or not 0 <= max_delay_s <= 10:
            raise ValueError(f"max_delay_s is {max_delay_s!r}; allowed: seconds in [0, 10]")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows is {max_rows!r}; allowed: an integer >= 1")
        if isinstance(compact_every, bool) or not isinstance(compact_every, int) or compact_every < 0:
            raise ValueError(f"compact_every is {compact_every!r}; allowed: an integer >= 0 (0: never)")
        if not isinstance(replica, str):
            raise ValueError(f"replica is {replica!r}; allowed: a string")
        self.dest = location(dest, endpoint_url)
        self.max_delay_s, self.max_rows, self.replica = float(max_delay_s), max_rows, replica
        self.writer_id = f"diffguard-audit:{replica}:{uuid.uuid4().hex}"  # its appends' application transaction
        self.groups = 0  # groups committed
        self.rows = 0  # rows committed
        self.failed_groups = 0
        self.compactions = 0  # compactions done by this log
        self.compact_every = compact_every
        self._compacting = threading.Lock()
        self._pending: list[tuple[dict[str, Any], concurrent.futures.Future[None], float]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._table: Any = None
        self._opened_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"audit-writer-{replica}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.dest)!r}, replica={self.replica!r}, groups={self.groups}, rows={self.rows})"

    async def record(self, row: dict[str, Any]) -> None:
        """Return once ``row`` is committed; :class:`AuditUnavailable` when its group could not be written,
        ``ValueError`` (naming the field) when the row is malformed."""
        await asyncio.wrap_future(self._submit(row))

    def record_sync(self, row: dict[str, Any]) -> None:
        """:meth:`record` for callers without an event loop (blocks the calling thread)."""
        self._submit(row).result()

    def _submit(self, row: dict[str, Any]) -> concurrent.futures.Future[None]:
        conformed = conform(row, self.replica)
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise AuditUnavailable(
                    f"the audit log {self.dest} is closed: row {conformed['request_id']} not written"
                )
            self._pending.append((conformed, future, time.monotonic()))
            if len(self._pending) == 1 or len(self._pending) >= self.max_rows:
                self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Write what is pending, then stop the writer; later ``record`` calls raise :class:`AuditUnavailable`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the writer thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return  # closed and drained
                deadline = self._pending[0][2] + self.max_delay_s  # the group's first row waits at most this
                while len(self._pending) < self.max_rows and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                group, self._pending = self._pending[: self.max_rows], self._pending[self.max_rows :]
            self._commit([row for row, _, _ in group], [future for _, future, _ in group])

    def _commit(self, rows: list[dict[str, Any]], futures: list[concurrent.futures.Future[None]]) -> None:
        try:
            data = to_table(rows)
        except Exception:  # noqa: BLE001 - conform() checked every row; keep a bad one from failing the others
            data, rows, futures = self._drop_bad(rows, futures)
            if not rows:
                return
        number = self.groups + self.failed_groups + 1  # increases with every append: the retry's idempotence token
        try:
            if self._table is not None and time.monotonic() - self._opened_at > REOPEN_S:
                self._table = None
            fresh = self._table is None
            self._table = append(self.dest, data, self.writer_id, number, self._table)
            if fresh:
                self._opened_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - whatever the store raised: every caller of this group is told
            self._table, self.failed_groups = None, self.failed_groups + 1
            log.error("audit log %s: a group of %d rows could not be written: %s", self.dest, len(rows), exc)
            error = f"the audit log {self.dest} could not be written ({type(exc).__name__}: {exc}); row not recorded"
            for future in futures:
                _settle(future, AuditUnavailable(error))
            return
        self.groups, self.rows = self.groups + 1, self.rows + len(rows)
        for future in futures:
            _settle(future, None)
        if self.compact_every and self.groups % self.compact_every == 0 and self._compacting.acquire(blocking=False):
            threading.Thread(target=self._compact, name=f"audit-compact-{self.replica}", daemon=True).start()

    def _compact(self) -> None:
        """Compact the table beside the appends (they do not conflict); a failure (another replica's compaction
        won the race) only waits for the next turn."""
        try:
            compact(self.dest)
            self.compactions += 1
        except Exception as exc:  # noqa: BLE001
            log.info("audit log %s: compaction skipped: %s", self.dest, exc)
        finally:
            self._compacting.release()

    @staticmethod
    def _drop_bad(rows: list[dict[str, Any]], futures: list[concurrent.futures.Future[None]]) -> tuple[Any, list, list]:
        good_rows, good_futures = [], []
        for row, future in zip(rows, futures, strict=True):
            try:
                to_table([row])
            except Exception as exc:  # noqa: BLE001 - Arrow's conversion errors
                _settle(future, ValueError(f"audit row {row.get('request_id')!r} does not fit the schema: {exc}"))
            else:
                good_rows.append(row)
                good_futures.append(future)
        return (to_table(good_rows) if good_rows else None), good_rows, good_futures


def _settle(future: concurrent.futures.Future[None], error: BaseException | None) -> None:
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:  # its caller was cancelled (a client that went away)
        pass
