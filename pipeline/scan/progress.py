"""A scan's progress as Prometheus series, exported by Ray's metrics agent while the scan runs (docs/SCANS.md, Metrics).

The driver keeps this run's counts in a :class:`ScanProgress` (plain Python) and sends what changed to one detached
actor per Ray cluster, :class:`Holder` (``diffguard-scan-metrics`` in namespace ``diffguard``), which holds the
``ray.util.metrics`` objects. Why an actor and not the driver: Ray 2.60's metrics agent drops a gauge that has not been
recorded again for two export intervals (20 s with the default 10 s), and a driver records nothing once it is gone, so
a driver's own ``running`` would vanish ~20 s after a kill instead of staying at 1, and its 0 at the end would last
~20 s. The actor outlives the drivers and records its gauges again every few seconds: after a scan ended ``running``
stays 0; after a driver was killed it stays 1 with a ``last_progress_timestamp_seconds`` that no longer moves (what
the no-progress alert watches) until the next run of that DEST. Counters add up every run of a DEST while the actor
lives (a restarted actor starts them at 0 again: ``rate()`` takes the reset). Exported names get Ray's ``ray_`` prefix,
and counters ``_total``: ``ray_diffguard_scan_objects_listed_total{dest}``.

Nothing here imports Ray at import time; without Ray running (a small scan planned in the driver, nothing to read)
the counts are kept and sent once Ray runs, or never.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger("diffguard")

PREFIX = "diffguard_scan_"  # Ray's agent adds "ray_" (and "_total" to counters)
HOLDER = "diffguard-scan-metrics"  # the detached actor's name, in NAMESPACE
NAMESPACE = "diffguard"
REFRESH_S = 5.0  # the holder records its gauges again this often (the agent keeps one for 2 export intervals)
WAIT_S = 30.0  # how long the driver waits for the holder to take the run's last values
ERROR_KINDS = ("read", "unscorable")

COUNTERS = {  # name -> description (each tagged dest; errors also kind)
    "objects_listed": "Objects listed under the scan's SOURCE",
    "objects_read": "Objects read whole (bytes fetched) and committed: scored, or unscorable after reading",
    "objects_scored": "Objects read, decoded and given a verdict",
    "objects_flagged": "Objects withheld by the policy (flagged, or unscorable and withheld): what quarantine acts on",
    "errors": "Objects not scored: kind=read (retried next run) or kind=unscorable (not scorable, read or too large)",
    "bytes_read": "Bytes of the objects read whole",
    "quarantine_failures": "Quarantine moves or tags (--apply) that failed",
}
GAUGES = {
    "running": "1 while a scan of this DEST runs, 0 once it ended (stays 1 after a killed driver)",
    "last_progress_timestamp_seconds": "Unix time of the scan's last progress: start, listing, parts, finished shards",
}
SERIES = [(name, kind) for name in COUNTERS for kind in (ERROR_KINDS if name == "errors" else ("",))]


def part_series(counts: Mapping[str, int]) -> dict[tuple[str, str], int]:
    """What committed parts add to the series, from their counts (``pipeline.scan.job.COUNTS`` summed): rows,
    not_image, errors (read errors and unscorable), unscorable, flagged, read, bytes. -> (name, kind) -> increment."""
    return {
        ("objects_read", ""): counts["read"],
        ("objects_scored", ""): counts["rows"] - counts["not_image"] - counts["errors"],
        ("objects_flagged", ""): counts["flagged"],
        ("errors", "read"): counts["errors"] - counts["unscorable"],
        ("errors", "unscorable"): counts["unscorable"],
        ("bytes_read", ""): counts["bytes"],
    }


class Sink(Protocol):
    def record(self, dest: str, deltas: list[tuple[str, str, float]], gauges: dict[str, float], wait: bool) -> None:
        """Add ``deltas`` (name, kind, increment) to DEST's counters and set its gauges; ``wait``: until taken."""


class ScanProgress:
    """One run's series for one DEST: counted here, sent to the cluster's :class:`Holder` at each step once Ray runs.
    A metrics failure is logged once and never fails the scan.

    >>> progress = ScanProgress("s3://bucket/results")
    >>> progress.start(); progress.listed(1200); progress.committed(part_counts); progress.end()
    """

    def __init__(
        self,
        dest: str,
        *,
        enabled: bool = True,
        connect: Callable[[], Sink | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dest, self.enabled = dest, enabled
        self.counts: dict[tuple[str, str], int] = dict.fromkeys(SERIES, 0)  # this run's totals
        self.gauges: dict[str, float] = {}
        self._sent: dict[tuple[str, str], int] = {}  # what the holder has of this run (a key absent: not created)
        self._sink: Sink | None = None
        self._connect, self._clock = connect or holder, clock

    def start(self) -> None:
        self.gauges["running"] = 1
        self._progress()

    def listed(self, objects: int) -> None:
        self.counts["objects_listed", ""] += objects
        self._progress()

    def committed(self, counts: Mapping[str, int]) -> None:
        """Parts the workers committed (their counts, see :func:`part_series`)."""
        for key, n in part_series(counts).items():
            self.counts[key] += n
        self._progress()

    def acted(self, report: Mapping[str, int]) -> None:
        """A finished shard's action report (``failed``: quarantine moves or tags that failed)."""
        self.counts["quarantine_failures", ""] += report.get("failed", 0)
        self._progress()

    def end(self) -> None:
        self.gauges["running"] = 0
        self.flush(wait=True)

    def _progress(self) -> None:
        self.gauges["last_progress_timestamp_seconds"] = self._clock()
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what changed since the last send (every series once at first, at 0 if nothing happened yet)."""
        if not self.enabled:
            return
        try:
            if self._sink is None and (sink := self._connect()) is not None:
                self._sink = sink
            if self._sink is None:
                return  # no Ray yet: kept for the first send once it runs
            changed = {k: v for k, v in self.counts.items() if self._sent.get(k) != v}
            deltas = [(name, kind, float(v - self._sent.get((name, kind), 0))) for (name, kind), v in changed.items()]
            self._sink.record(self.dest, deltas, dict(self.gauges), wait)
        except Exception as exc:  # noqa: BLE001 - metrics never fail a scan
            log.warning("scan metrics are not exported (from now on): %s: %s", type(exc).__name__, exc)
            self.enabled = False
            return
        self._sent.update(changed)


class Holder:
    """The scan series of every DEST scanned on this Ray cluster: a detached actor (:func:`holder`) that records its
    gauges again every ``refresh_s`` so that Ray's agent keeps them after the drivers are gone."""

    def __init__(self, refresh_s: float = REFRESH_S) -> None:
        import ray
        from ray.util.metrics import Counter, Gauge

        tags = {name: ("dest", "kind") if name == "errors" else ("dest",) for name in COUNTERS}
        self._counters = {n: Counter(PREFIX + n, description=d, tag_keys=tags[n]) for n, d in COUNTERS.items()}
        self._gauges = {n: Gauge(PREFIX + n, description=d, tag_keys=("dest",)) for n, d in GAUGES.items()}
        self._values: dict[tuple[str, str], float] = {}  # (gauge, dest) -> its value
        self._lock = threading.Lock()
        with contextlib.suppress(AttributeError, TypeError):  # the agent keeps a gauge 2 export intervals
            refresh_s = min(refresh_s, ray._config.metrics_report_interval_ms() / 2000)
        threading.Thread(target=self._refresh, args=(max(refresh_s, 0.5),), daemon=True, name="refresh").start()

    def record(self, dest: str, deltas: list[tuple[str, str, float]], gauges: dict[str, float]) -> None:
        with self._lock:
            for name, kind, delta in deltas:
                tags = {"dest": dest, "kind": kind} if name == "errors" else {"dest": dest}
                if delta > 0:
                    self._counters[name].inc(delta, tags)
                else:  # the series, created at 0 (inc refuses 0): rate() then counts the first increment too
                    self._counters[name]._record(0.0, tags)
            for name, value in gauges.items():
                self._values[name, dest] = value
                self._gauges[name].set(value, {"dest": dest})

    def _refresh(self, every: float) -> None:
        while True:
            time.sleep(every)
            with self._lock:
                for (name, dest), value in self._values.items():
                    self._gauges[name].set(value, {"dest": dest})


class _RemoteHolder:
    """The cluster's :class:`Holder` actor (created on this driver's node if there is none yet)."""

    def __init__(self, ray: Any) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        options = {"name": HOLDER, "namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True}
        options |= {"num_cpus": 0, "max_restarts": -1, "scheduling_strategy": here}
        self._ray, self._actor = ray, ray.remote(Holder).options(**options).remote()

    def record(self, dest: str, deltas: list[tuple[str, str, float]], gauges: dict[str, float], wait: bool) -> None:
        ref = self._actor.record.remote(dest, deltas, gauges)  # calls from one driver run in order
        if wait:
            self._ray.get(ref, timeout=WAIT_S)


def holder() -> Sink | None:
    """The cluster's holder when Ray runs in this process, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return _RemoteHolder(ray)
