"""Shared pieces of the review tests: synthetic scan results (any size) over real image files, and the app served
over real HTTP (uvicorn in a subprocess, so a test can kill it)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa

from pipeline.scan.state import MANIFEST, PartWriter, conform, rows_table
from pipeline.storage import LocalStore, canonical_key, parse_location, sha256
from tests.conftest import ROOT

CATEGORIES = ("sexual", "violence", "hate")
ODD_KEYS = ("a b/ünï ?#%.png", "x/../y.png", "d//e.png", "100%/f g+h&.png", "trailing/", "thumbnail/decision")


def results(
    dest: Path, source: Path | str, keys: list[str], seed: int = 0, images: bool = True, s3=None, run: int = 1
) -> pa.Table:
    """Scan rows for ``keys`` under ``source`` (a local directory, or a bucket name with ``s3`` a boto3 client), each
    a real PNG when ``images``, committed as one part of ``run`` under ``dest``. Scores are seeded: about a third
    allowed, the rest reported (flag), withheld (block) or unscorable."""
    from tests.integration.scan_support import png

    rng = np.random.default_rng(seed)
    n = len(keys)
    score = np.round(rng.uniform(-0.2, 0.2, (n, len(CATEGORIES))), 4)
    kind = rng.integers(0, 6, n)  # 0-1 allow, 2 flag, 3-4 block, 5 unscorable
    now = datetime.now(UTC)
    rows = []
    for i, key in enumerate(keys):
        data, etag = png(seed * 100_000 + i, (24, 32)), f"etag-{i}"
        if images and s3 is not None:
            s3.put_object(Bucket=str(source), Key=key, Body=data)
            etag = s3.head_object(Bucket=str(source), Key=key)["ETag"].strip('"')
        elif images:
            path = Path(source) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if canonical_key(key):  # the scan's own etag of the file (odd keys name no one path: never read)
                etag = LocalStore(str(Path(source).resolve())).head(key).etag
        if kind[i] == 5:
            cats, flagged, action, error = {}, [], "block", "corrupt or truncated image"
        else:
            cats = dict(zip(CATEGORIES, score[i].tolist(), strict=True))
            if kind[i] < 2:
                cats = {c: -abs(s) - 0.001 for c, s in cats.items()}
            else:
                cats[CATEGORIES[i % 3]] = abs(cats[CATEGORIES[i % 3]]) + 0.001
            flagged = [c for c, s in cats.items() if s > 0]
            action, error = ("allow", "flag", "flag", "block", "block")[kind[i]], None
        rows.append(
            {
                "bucket": str(source),
                "key": key,
                "etag": etag,
                "size": 100 + i,
                "last_modified": now,
                "sha256": sha256(data) if images else None,  # of the bytes "scored": what a review shows is checked
                "nsfw": action == "block" and "sexual" in flagged,
                "concept_scores": [max(cats.values())] if cats else [],
                "categories": cats,
                "flagged_categories": flagged,
                "action": action,
                "flagged": action == "block",
                "error": error,
                "error_kind": "decode" if error else None,
                "unscorable": bool(error),
                "model_fingerprint": "fp-1",
                "scanned_at": now,
            }
        )
    table = conform(rows_table(rows))
    PartWriter(parse_location(str(dest)), run).commit(table)
    return table


def manifest(dest: Path, source: Path | str, demo: bool, run: int = 1) -> None:
    """The manifest a scan commits, as far as the review app reads it: its SOURCE and its last run's summary, which
    says whether the checker ran tiny demo weights (format 1 with no snapshot: the rows stay in the parts)."""
    body = {"format": 1, "source": str(source), "last_run": {"run": run, "fingerprint": "fp-1", "demo": demo}}
    Path(dest, MANIFEST).write_text(json.dumps(body))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReviewServer:
    """``diffguard review DEST`` (``python -m pipeline review``) in a subprocess on a free port.

    ``token``: the key to send (the per-start token parsed from the start-up line, else ``DIFFGUARD_API_KEY`` from
    ``env``); ``headers`` carry it; ``client`` is an httpx client sending them; ``page_url`` opens the page with it."""

    TOKEN = re.compile(r"#token=([A-Za-z0-9_-]+)")

    def __init__(self, dest: Path | str, *extra: str, env: dict[str, str] | None = None, host: str = "127.0.0.1"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.token: str | None = ((env or {}).get("DIFFGUARD_API_KEY") or "").strip() or None
        cmd = [sys.executable, "-m", "pipeline", "review", str(dest), "--host", host, "--port", str(self.port), *extra]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="review-app-", suffix=".log")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=environ, cwd=ROOT, stderr=self.log, text=True)
        self.client = httpx.Client(timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def page_url(self) -> str:
        return f"{self.url}/#token={self.token}" if self.token else f"{self.url}/"

    def stderr(self) -> str:
        return Path(self.log.name).read_text()

    def wait(self, timeout: float = 120.0, headers: dict[str, str] | None = None) -> float:
        """Seconds from start until /api/info answers (with the printed token, once it is printed)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"review app exited {self.proc.returncode}: {self.stderr()}")
            sent = self.token
            try:
                answer = httpx.get(self.url + "/api/info", headers=headers or self.headers, timeout=2)
                found = self.TOKEN.search(self.stderr())  # printed before the app listens: there once it answers
                self.token = found.group(1) if found else self.token
                if answer.status_code in (200, 401) and self.token == sent:
                    self.client.headers.update(self.headers)
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"review app not up after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        self.log.close()

    def __enter__(self) -> ReviewServer:
        self.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
