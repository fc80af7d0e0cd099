"""A scan's progress series (issue 29), read from the node's real metrics endpoint while the scan runs and after it:
each series of the contract with the exact counts of the scan (docs/SCANS.md, Metrics), ``running`` 1 while it runs
and 0 at its end, still 1 after a killed driver, and ``--metrics-port`` refused when Ray already runs in the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.scan_support import new_bucket, png, put_many, scan, summary

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

EXPORT_INTERVAL_S = 10  # Ray's agent exports every 10 s (RAY_metrics_report_interval_ms)
EXPORT_DEADLINE_S = 60  # a deadline on the values appearing, not a timing assertion
IMAGES = 6


def scrape(dest: str) -> dict[tuple[str, str], float]:
    """This node's ``ray_diffguard_scan_*`` samples for ``dest``: (name, kind) -> value, one series each."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_diffguard_scan_") and sample.labels.get("dest") == dest:
                key = (sample.name, sample.labels.get("kind", ""))
                assert key not in found, f"two series for {key}: {text}"
                found[key] = sample.value
    return found


def wait_for(dest: str, expected: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Scrape until ``expected`` is a subset of what is exported (or the deadline passes: then the last scrape)."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        found = scrape(dest)
        if all(found.get(k) == v for k, v in expected.items()) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def series(counts: dict[str, int], running: int) -> dict[tuple[str, str], float]:
    """The contract's series (timestamp aside) for these counts."""
    names = ("objects_listed", "objects_read", "objects_scored", "objects_flagged", "bytes_read", "quarantine_failures")
    out = {(f"ray_diffguard_scan_{n}_total", ""): counts[n] for n in names}
    out |= {("ray_diffguard_scan_errors_total", kind): counts[f"errors_{kind}"] for kind in ("read", "unscorable")}
    return out | {("ray_diffguard_scan_running", ""): running}


def finish_waits_for(gate: Path):  # noqa: ANN201
    """The finish stage (actions, the shard's table file), held until ``gate`` exists: the scan is then still running,
    with every part scored and committed."""
    from pipeline.scan import job

    finish_shard = job.finish_shard

    def finish(*args):  # noqa: ANN002, ANN202
        while not gate.exists():
            time.sleep(0.05)
        return finish_shard(*args)

    return finish


@pytest.mark.usefixtures("ray_cluster")
def test_the_scan_series_move_while_it_runs_and_end_with_its_exact_counts(
    s3, s3_endpoint, capsys, monkeypatch, tmp_path
):
    from pipeline.scan import job
    from pipeline.storage import parse_location

    bucket = new_bucket(s3)
    images = {f"in/{i}.png": png(700 + i) for i in range(IMAGES)}
    broken = b"\x89PNG\r\n\x1a\n not really"  # read whole, not scorable: withheld
    put_many(s3, bucket, {**images, "in/broken.png": broken, "in/notes.txt": b"not an image"})
    s3.put_object(Bucket=bucket, Key="in/cold.png", Body=png(799), StorageClass="GLACIER")  # GET fails: a read error
    dest = f"s3://{bucket}/results"
    tag = str(parse_location(dest, s3_endpoint, "--output"))  # the dest label: the --output as the scan names it
    gate = tmp_path / "gate"
    monkeypatch.setattr(job, "finish_shard", finish_waits_for(gate))
    args = (f"s3://{bucket}/in", "--output", dest, "--endpoint-url", s3_endpoint, "--adjustment", "1")
    args += ("--batch-size", "2", "--part-rows", "2", "--apply", "--quarantine", f"s3://no-such-{bucket}/held")
    counts = {
        "objects_listed": IMAGES + 3,  # the images, broken.png, notes.txt and cold.png
        "objects_read": IMAGES + 1,  # broken.png was read whole; cold.png and notes.txt (sniffed) were not
        "objects_scored": IMAGES,
        "objects_flagged": IMAGES + 1,  # --adjustment 1 flags every image; broken.png is withheld unscorable
        "bytes_read": sum(map(len, images.values())) + len(broken),
        "quarantine_failures": 0,
        "errors_read": 1,  # cold.png
        "errors_unscorable": 1,  # broken.png
    }

    outcome: dict = {}
    began = time.time()
    scanning = threading.Thread(target=lambda: outcome.update(zip(("rc", "out"), scan(capsys, *args), strict=True)))
    scanning.start()
    try:  # held before its actions: every part is committed and counted, the scan still runs
        exported = wait_for(tag, series(counts, running=1))
        assert scanning.is_alive() and not gate.exists()
        stamp = exported.pop(("ray_diffguard_scan_last_progress_timestamp_seconds", ""), None)
        assert exported == series(counts, running=1)
        assert stamp is not None and began <= stamp <= time.time()
    finally:
        gate.touch()
        scanning.join(timeout=300)
    ended = time.time()
    assert not scanning.is_alive()
    assert outcome["rc"] == 0 and outcome["out"] == summary(IMAGES + 2, 0, 1, IMAGES + 1, 2, dest)

    counts["quarantine_failures"] = IMAGES + 1  # the quarantine bucket does not exist: every move failed
    exported = wait_for(tag, series(counts, running=0))
    stamp = exported.pop(("ray_diffguard_scan_last_progress_timestamp_seconds", ""), None)
    assert exported == series(counts, running=0)
    assert stamp is not None and began <= stamp <= ended


@pytest.mark.usefixtures("ray_cluster")
def test_metrics_port_is_refused_when_ray_already_runs_here(tmp_path, capsys):
    import ray

    from pipeline.cli import main

    (tmp_path / "src").mkdir()
    rc = main(["scan", str(tmp_path / "src"), "--output", str(tmp_path / "dest"), "--metrics-port", "9300"])
    port = ray._private.worker.global_worker.node.metrics_export_port
    assert rc == 2 and capsys.readouterr().err.strip() == (
        "diffguard: error: --metrics-port 9300: Ray already runs in this process and the scan uses it; its metrics "
        f"are on its own port, http://127.0.0.1:{port}/metrics; drop --metrics-port"
    )
    assert not (tmp_path / "dest").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_driver_leaves_running_at_1_and_its_progress_still(tmp_path):
    """What the no-progress alert watches: the series outlive a driver killed mid-run (the holder actor keeps them,
    where Ray's agent would drop a dead driver's gauges after two export intervals)."""
    import ray

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    for i in range(IMAGES):
        (src / f"{i}.png").write_bytes(png(800 + i))
    env = {**os.environ, "RAY_ADDRESS": ray._private.worker.global_worker.node.address, "RAY_AUTH_MODE": "token"}
    args = [str(src), "--output", str(dest), "--batch-size", "2", "--part-rows", "2", "--dtype", "float32"]
    proc = subprocess.Popen(  # a driver of its own on this session's cluster: workers stall after the first part
        [sys.executable, "-m", "tests.stalling_scan", "1", *args, "--device", "cpu"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        running = {("ray_diffguard_scan_running", ""): 1, ("ray_diffguard_scan_objects_listed_total", ""): IMAGES}
        exported = wait_for(str(dest), running)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert running.items() <= exported.items()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    before = scrape(str(dest))
    time.sleep(3 * EXPORT_INTERVAL_S)  # past the two export intervals after which Ray's agent drops a stale gauge
    after = scrape(str(dest))
    assert after == before and after["ray_diffguard_scan_running", ""] == 1
    assert ("ray_diffguard_scan_last_progress_timestamp_seconds", "") in after
