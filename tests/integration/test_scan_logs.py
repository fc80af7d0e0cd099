"""What a person reads from a normal scan (issue 27): at the default verbosity its stderr holds the scan's own lines
and no WARNING or ERROR from Ray; the scan starts its own local Ray, as `diffguard scan` in a fresh shell does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ALARM, ROOT
from tests.integration.scan_support import png

pytestmark = pytest.mark.slow  # a local Ray of its own: ~30 s on 2 cores


def test_a_small_scan_prints_no_warning_or_error_from_ray(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(png(700 + i))
    (src / "notes.txt").write_text("not an image")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own, as in a shell
    cmd = [sys.executable, "-m", "pipeline", "scan", str(src), "--output", str(tmp_path / "dest"), "--device", "cpu"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "objects listed" in result.stdout  # the summary table
    lines = result.stderr.splitlines()
    alarms = [line for line in lines if ALARM.search(line) and "tiny demo weights in use" not in line]
    assert alarms == [], "\n".join(alarms)  # the tiny banner is the one warning, and a real one
    assert any("objects read and committed" in line or "scored and committed" in line for line in lines), lines
    assert not any("Execution plan" in line or "logging_progress" in line for line in lines), lines  # Ray Data INFO
