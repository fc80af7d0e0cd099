"""The scan's progress series without Ray (pipeline.scan.progress): what a part's counts add to each series, what the
driver sends to the holder at each step (every series once at 0, then only what changed), counts kept until Ray runs,
a failing holder never failing the scan, and ``--metrics-port`` refused on a cluster the scan would join."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pipeline.scan.progress import COUNTERS, GAUGES, SERIES, ScanProgress, part_series
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

DEST = "s3://bucket/results/"
# one part's counts as pipeline.scan.job.COUNTS has them: 10 rows, 2 not images, 3 errors of which 1 unscorable
PART = {"rows": 10, "not_image": 2, "errors": 3, "unscorable": 1, "flagged": 4, "read": 6, "bytes": 6_000}


class Recorder:
    """A holder that keeps what it is sent, as the actor would add it up."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str, float]], dict[str, float], bool]] = []
        self.totals: dict[tuple[str, str], float] = {}

    def record(self, dest: str, deltas: list[tuple[str, str, float]], gauges: dict[str, float], wait: bool) -> None:
        self.calls.append((dest, deltas, gauges, wait))
        for name, kind, delta in deltas:
            assert delta >= 0, (name, kind, delta)
            self.totals[name, kind] = self.totals.get((name, kind), 0) + delta


def test_a_part_adds_to_each_series_what_the_summary_counts():
    assert part_series(PART) == {
        ("objects_read", ""): 6,
        ("objects_scored", ""): 5,  # rows - not images - errors (ScanSummary.scored)
        ("objects_flagged", ""): 4,
        ("errors", "read"): 2,  # errors - unscorable
        ("errors", "unscorable"): 1,
        ("bytes_read", ""): 6_000,
    }
    assert set(part_series(PART)) | {("objects_listed", ""), ("quarantine_failures", "")} == set(SERIES)


def test_the_series_are_the_contracts():
    exported = {f"ray_diffguard_scan_{n}_total" for n in COUNTERS} | {f"ray_diffguard_scan_{n}" for n in GAUGES}
    assert exported == {
        "ray_diffguard_scan_objects_listed_total",
        "ray_diffguard_scan_objects_read_total",
        "ray_diffguard_scan_objects_scored_total",
        "ray_diffguard_scan_objects_flagged_total",
        "ray_diffguard_scan_errors_total",
        "ray_diffguard_scan_bytes_read_total",
        "ray_diffguard_scan_quarantine_failures_total",
        "ray_diffguard_scan_running",
        "ray_diffguard_scan_last_progress_timestamp_seconds",
    }


def test_each_step_sends_every_series_once_then_only_what_changed():
    sink, now = Recorder(), iter(range(100, 200))
    progress = ScanProgress(DEST, connect=lambda: sink, clock=lambda: float(next(now)))
    progress.start()
    dest, deltas, gauges, wait = sink.calls[0]
    assert dest == DEST and not wait
    assert sorted(deltas) == sorted((name, kind, 0.0) for name, kind in SERIES)  # created at 0
    assert gauges == {"running": 1, "last_progress_timestamp_seconds": 100.0}

    progress.listed(40)
    assert sink.calls[-1][1:3] == ([("objects_listed", "", 40.0)], gauges | {"last_progress_timestamp_seconds": 101})
    progress.committed(PART)
    progress.committed(PART)
    progress.acted({"eligible": 3, "done": 1, "failed": 2})
    progress.acted({"eligible": 0, "done": 0, "failed": 0})  # nothing changed: no counter sent, the time moves
    assert sink.calls[-1][1:3] == ([], {"running": 1, "last_progress_timestamp_seconds": 105.0})
    progress.end()
    assert sink.calls[-1] == (DEST, [], {"running": 0, "last_progress_timestamp_seconds": 105.0}, True)
    assert sink.totals == {
        **dict.fromkeys(SERIES, 0),
        ("objects_listed", ""): 40,
        **{key: 2 * n for key, n in part_series(PART).items()},
        ("quarantine_failures", ""): 2,
    }
    assert sink.totals == {k: float(v) for k, v in progress.counts.items()}


def test_counts_made_before_ray_runs_are_sent_once_it_does():
    sink, ray_up = Recorder(), []
    progress = ScanProgress(DEST, connect=lambda: sink if ray_up else None, clock=lambda: 7.0)
    progress.start()
    progress.listed(3)  # a small scan plans in the driver: no Ray yet
    assert sink.calls == []
    ray_up.append(True)  # the scoring stage starts Ray
    progress.committed(PART)
    (_, deltas, gauges, _), *_ = sink.calls
    assert dict(((n, k), d) for n, k, d in deltas)["objects_listed", ""] == 3
    assert gauges["running"] == 1 and sink.totals == {k: float(v) for k, v in progress.counts.items()}


def test_without_ray_nothing_is_sent_and_nothing_fails():
    progress = ScanProgress(DEST)  # the real connect: Ray is not running in this process
    progress.start()
    progress.committed(PART)
    progress.end()
    assert progress.enabled and progress.counts["objects_scored", ""] == 5


def test_a_disabled_progress_never_connects():
    progress = ScanProgress(DEST, enabled=False, connect=lambda: pytest.fail("connected"))
    progress.start()
    progress.end()


def test_a_failing_holder_is_logged_once_and_never_fails_the_scan(caplog):
    class Broken:
        calls = 0

        def record(self, *args: object) -> None:
            Broken.calls += 1
            raise RuntimeError("the actor died")

    progress = ScanProgress(DEST, connect=Broken)
    with caplog.at_level(logging.WARNING, logger="diffguard"):
        progress.start()
        progress.committed(PART)
        progress.end()
    assert Broken.calls == 1 and not progress.enabled
    assert [r.getMessage() for r in caplog.records] == [
        "scan metrics are not exported (from now on): RuntimeError: the actor died"
    ]


def test_importing_the_progress_module_does_not_import_ray():
    code = "import sys, pipeline.scan.progress; sys.exit(7 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=300).returncode == 0


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_metrics_port_must_be_a_tcp_port(port, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["scan", "src", "--output", "dest", "--metrics-port", port])
    assert exc.value.code == 2
    assert f"--metrics-port: expected a TCP port (1-65535), got {port if port == 'http' else int(port)}" in (
        capsys.readouterr().err.replace("'", "")
    )


def test_metrics_port_is_refused_when_the_scan_joins_a_cluster(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    (tmp_path / "src").mkdir()
    rc = main(["scan", str(tmp_path / "src"), "--output", str(tmp_path / "dest"), "--metrics-port", "9300"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        "diffguard: error: --metrics-port 9300: this scan joins the Ray cluster at RAY_ADDRESS=10.0.0.5:6379, whose "
        "nodes export the scan's metrics on their own port (8080 on KubeRay); drop --metrics-port or unset RAY_ADDRESS"
    )
    assert not (tmp_path / "dest").exists()  # refused before anything started
