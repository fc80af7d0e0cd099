"""Scan faults: ``diffguard scan --quarantine --apply`` SIGKILLed at random points and rerun, and a scan through
transient S3 faults (``tests/faultproxy.py`` in front of moto). After each, the bucket is audited.

Kill points are random over the scan's storage operations: every request goes through a fault-free proxy that counts
them, and on the n-th mutating request (PUT, POST, DELETE; n drawn across the whole run) the scan's process group is
SIGKILLed, the request is then either dropped or still delivered (a crash just before, or just after, a write
landed). Part commits, quarantine journal entries, copies, deletes, the row update, the snapshot, the manifest and
the clean-up all get hit. The rerun happens in this process, on this process's Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from typing import Any

from tests.conftest import ROOT
from tests.faultproxy import DEFAULT_KINDS, FaultProxy

MUTATING = ("PUT", "POST", "DELETE")


def put_images(s3: Any, bucket: str, images: dict[str, bytes]) -> None:
    for key, data in images.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)


def new_bucket(s3: Any) -> str:
    name = f"r-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


def scan_args(bucket: str, endpoint: str, adjustment: float, apply: bool = True) -> list[str]:
    args = [
        f"s3://{bucket}/imgs",
        "--output",
        f"s3://{bucket}/results",
        "--endpoint-url",
        endpoint,
        "--quarantine",
        "held",
        "--adjustment",
        str(adjustment),
        "--batch-size",
        "4",
        "--part-rows",
        "4",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--json",
    ]
    return [*args, "--apply"] if apply else args


def scan_here(args: list[str]) -> tuple[int, dict | None]:
    """``diffguard scan`` in this process (on this process's Ray): exit code and its one JSON summary."""
    from pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["scan", *args])
    lines = out.getvalue().splitlines()
    return rc, json.loads(lines[-1]) if lines else None


def _keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _body(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def storage_state(s3: Any, bucket: str) -> dict[str, int]:
    """What a killed run left behind (read directly from the store)."""
    results = _keys(s3, bucket, "results/")
    return {
        "parts": sum("/parts/" in k for k in results),
        "journal": sum("/_quarantine/" in k for k in results),
        "snapshots": sum("/snapshots/" in k for k in results),
        "manifest": sum(k.endswith("_diffguard_scan.json") for k in results),
        "held": len(_keys(s3, bucket, "held/")),
        "source": len(_keys(s3, bucket, "imgs/")),
    }


def audit(s3: Any, bucket: str, endpoint: str, images: dict[str, bytes], expected: dict[str, bool]) -> dict[str, int]:
    """After a completed run: one current row per object, every object exactly once (at its key, or quarantined when
    flagged), every object scored with the expected verdict, no journal entry left."""
    from pipeline.scan import read_current
    from pipeline.storage import sha256

    table = read_current(f"s3://{bucket}/results", endpoint)
    keys = table["key"].to_pylist()
    rows = {r["key"]: r for r in table.to_pylist()}
    held: dict[str, list[str]] = defaultdict(list)
    for key in _keys(s3, bucket, "held/"):
        held[sha256(_body(s3, bucket, key))].append(key)
    source = set(_keys(s3, bucket, "imgs/"))
    lost = duplicated = misplaced = 0
    for key, data in images.items():
        at_source = key in source and _body(s3, bucket, key) == data
        copies = held.get(sha256(data), [])
        lost += not at_source and not copies
        duplicated += (at_source and bool(copies)) or len(copies) > 1
        misplaced += at_source == expected[key]  # flagged objects belong in quarantine, the rest at their key
    return {
        "objects": len(images),
        "rows": len(keys),
        "duplicate_rows": len(keys) - len(set(keys)),
        "missing_rows": len(set(images) - set(keys)),
        "unscored": sum(r["error"] is not None for r in rows.values()),
        "wrong_verdicts": sum(rows[k]["nsfw"] != expected[k] for k in rows if k in expected),
        "lost_objects": lost,
        "duplicated_objects": duplicated,
        "misplaced_objects": misplaced,
        "unrecorded_moves": sum(expected[k] and not (rows.get(k) or {}).get("quarantined_to") for k in images),
        "journal_left": storage_state(s3, bucket)["journal"],
    }


BAD = ("duplicate_rows", "missing_rows", "unscored", "wrong_verdicts", "lost_objects", "duplicated_objects")
BAD += ("misplaced_objects", "unrecorded_moves", "journal_left")


def violations(audited: dict[str, int]) -> dict[str, int]:
    return {k: audited[k] for k in BAD if audited[k]}


def _ray_env() -> dict[str, str]:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


class Killer:
    """A proxy hook: counts mutating requests and SIGKILLs the scan's process group on the n-th."""

    def __init__(self, at: int | None, deliver: bool, stage: str = ""):
        self.at, self.deliver, self.seen, self.pgid, self.killed_on = at, deliver, 0, None, None
        self.stage = stage  # count only the requests whose "METHOD key" holds this (the run's order varies)
        self.requests: list[str] = []  # "METHOD key" of each mutating request, in order

    def __call__(self, method: str, path: str) -> str | None:
        if method not in MUTATING:
            return None
        self.seen += 1
        self.requests.append(f"{method} {path.split('?')[0].split('/', 2)[-1]}")
        counted = sum(self.stage in r for r in self.requests) if self.stage else self.seen
        if self.killed_on is None and self.at is not None and counted >= self.at and self.pgid is not None:
            os.killpg(self.pgid, signal.SIGKILL)
            self.killed_on = self.requests[-1]
            return "drop-after" if self.deliver else "drop"
        return "drop" if self.killed_on is not None else None  # the process is gone: nothing else lands


def run_killed(
    args_for: Any, endpoint: str, at: int | None, deliver: bool, timeout_s: float = 300, stage: str = ""
) -> dict:
    """Run the scan as a subprocess behind a counting proxy; kill it on mutating request ``at`` (None: never), or on
    the ``at``-th of those whose "METHOD key" holds ``stage``."""
    killer = Killer(at, deliver, stage)
    with FaultProxy(endpoint, rate=0.0, hook=killer) as proxy:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "scan", *args_for(proxy.url)],
            cwd=ROOT,
            env=_ray_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: the kill takes the whole driver
        )
        killer.pgid = proc.pid
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise
    return {
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - start, 2),
        "mutating_requests": killer.seen,
        "requests": killer.requests,
        "killed_on": killer.killed_on,
        "stderr_tail": err[-2000:] if proc.returncode not in (0, -signal.SIGKILL) else "",
    }


def reset(s3: Any, bucket: str, images: dict[str, bytes], results: dict[str, bytes]) -> None:
    """Put the bucket back to: the images at their keys, nothing quarantined, and ``results`` as saved."""
    for prefix in ("imgs/", "held/", "results/"):
        for key in _keys(s3, bucket, prefix):
            s3.delete_object(Bucket=bucket, Key=key)
    put_images(s3, bucket, {**images, **results})


def _trial(s3, endpoint, bucket, images, adjustment, expected, points: list[int], rng, stage="") -> dict[str, Any]:  # noqa: ANN001
    kills = []
    for n, at in enumerate(points):
        run = run_killed(
            lambda url: scan_args(bucket, url, adjustment), endpoint, at, rng.random() < 0.5, stage=stage * (n == 0)
        )
        kills.append({"at_request": at, **run, "left": storage_state(s3, bucket)})
    start = time.monotonic()
    rc, summary = scan_here(scan_args(bucket, endpoint, adjustment))
    audited = audit(s3, bucket, endpoint, images, expected)
    return {
        "kills": kills,
        "rerun_rc": rc,
        "rerun_s": round(time.monotonic() - start, 2),
        "rerun_summary": summary,
        "audit": audited,
        "violations": violations(audited),
    }


def sigkill_trials(
    s3: Any,
    endpoint: str,
    images: dict[str, bytes],
    adjustment: float,
    expected: dict[str, bool],
    trials: int = 10,
    scoring_trials: int = 2,
    kills_per_trial: int = 1,
    seed: int = 0,
    aim: tuple[str, ...] = (),
) -> dict[str, Any]:
    """SIGKILL ``scan --quarantine held --apply`` at random storage operations, rerun it here, audit the bucket.

    ``trials``: the run acts on a scored dry run (the documented ``--apply`` after a dry run), so kills land among
    quarantine journal entries, copies, deletes, the row update, the snapshot, the manifest and the clean-up; the
    bucket is reset to the scored state before each. ``scoring_trials``: a fresh bucket, killed while committing
    parts of scored rows. ``kills_per_trial`` > 1 kills successive runs before the completing rerun.
    ``aim``: instead of ``trials`` stratified points, one trial per stage named here (a substring of "METHOD key"),
    killed at its n-th request of that stage, n drawn from the uninterrupted run's count (a stage that run does not
    reach gets no trial).
    """
    rng = random.Random(seed)
    bucket = new_bucket(s3)
    put_images(s3, bucket, images)
    rc, _ = scan_here(scan_args(bucket, endpoint, adjustment, apply=False))
    if rc != 0:
        raise RuntimeError("the dry run that scores the bucket failed")
    scored = {key: _body(s3, bucket, key) for key in _keys(s3, bucket, "results/")}
    calibration = run_killed(lambda url: scan_args(bucket, url, adjustment), endpoint, None, False)
    baseline = audit(s3, bucket, endpoint, images, expected)
    if calibration["rc"] != 0 or violations(baseline):
        raise RuntimeError(f"the uninterrupted run failed: {calibration['stderr_tail']} {violations(baseline)}")
    total = calibration["mutating_requests"]
    counts = {stage: sum(stage in r for r in calibration["requests"]) for stage in aim}
    firsts = [(stage, rng.randint(1, n)) for stage, n in counts.items() if n] if aim else [("", None)] * trials
    records = []
    for i, (stage, aimed) in enumerate(firsts):
        reset(s3, bucket, images, scored)
        first = aimed or 1 + int((i + rng.random()) * total / trials)  # stratified: every stretch of the run gets hit
        later = max(1, (total - first) // 2)  # a rerun has less left to write: kill it early enough to land
        points = [first] + [rng.randint(1, later) for _ in range(kills_per_trial - 1)]
        outcome = _trial(s3, endpoint, bucket, images, adjustment, expected, points, rng, stage)
        records.append({"trial": i, "phase": "actions", **outcome})
    parts = -(-len(images) // 4)  # --part-rows 4: a fresh scan commits this many parts; the kill lands on one of them
    for i in range(scoring_trials):
        fresh = new_bucket(s3)
        put_images(s3, fresh, images)
        points = [rng.randint(1, parts)] + [rng.randint(1, total // 2) for _ in range(kills_per_trial - 1)]
        outcome = _trial(s3, endpoint, fresh, images, adjustment, expected, points, rng, "/parts/")
        records.append({"trial": len(firsts) + i, "phase": "scoring", **outcome})
    return {
        "objects": len(images),
        "trials": len(records),
        "kills": sum(len(r["kills"]) for r in records),
        "mutating_requests_per_run": total,
        "calibration": calibration,
        "records": records,
    }


def faulty_s3_scan(
    s3: Any,
    endpoint: str,
    images: dict[str, bytes],
    adjustment: float,
    expected: dict[str, bool],
    rate: float = 0.15,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    seed: int = 0,
) -> dict[str, Any]:
    """One scan (with quarantine) whose every S3 request goes through the fault proxy; audited directly on moto."""
    bucket = new_bucket(s3)
    put_images(s3, bucket, images)
    with FaultProxy(endpoint, rate=rate, kinds=kinds, seed=seed) as proxy:
        start = time.monotonic()
        rc, summary = scan_here(scan_args(bucket, proxy.url, adjustment))
        seconds = time.monotonic() - start
        counts, by_method = dict(proxy.counts), dict(sorted(proxy.by_method.items()))
    audited = audit(s3, bucket, endpoint, images, expected)
    return {
        "rate": rate,
        "kinds": list(kinds),
        "rc": rc,
        "seconds": round(seconds, 1),
        "summary": summary,
        "requests": sum(counts.values()),
        "injected": sum(n for k, n in counts.items() if k != "pass"),
        "counts": counts,
        "by_method": by_method,
        "audit": audited,
        "violations": violations(audited),
    }
