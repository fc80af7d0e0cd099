"""A simulated three-node cluster (CPU head, two workers advertising logical GPUs) running the production-shaped
Serve config: placement as configured, the checker scaling up under load and back down after it, every request
succeeding and audited meanwhile (driver: ``tests/reliability/multinode.py``).

The cluster runs in a child process: one Ray per process, and this session's own Ray (``ray_cluster``) may be up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # deselected by `make test-fast`


def test_multinode_placement_and_autoscaling(tmp_path):
    out = tmp_path / "multinode.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.reliability.multinode", "--out", str(out), "--load-s", "30"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print({k: v for k, v in r.items() if k != "replica_timeline"})

    for moment in ("placement_start", "placement_peak", "placement_end"):
        p = r[moment]
        assert p["nodes"] == 3 and p["gpu_nodes"] == 2
        gen, chk = p["Generator"], p["SafetyChecker"]
        assert gen["gpus_per_replica"] == 1 and chk["gpus_per_replica"] == 0.25  # as production.yaml says
        assert gen["on_gpu_nodes"] == gen["replicas"] == 1 and chk["on_gpu_nodes"] == chk["replicas"]
        used = gen["replicas"] + chk["replicas"] * 0.25  # what the cluster's own GPU accounting must show
        if moment == "placement_peak":
            assert p["gpus_in_use"] >= used  # a replica still starting already holds its share
        else:
            assert p["gpus_in_use"] == used

    assert r["placement_start"]["SafetyChecker"]["replicas"] == r["min_replicas"] == 1
    assert r["peak_replicas"] > 1 and r["placement_peak"]["SafetyChecker"]["replicas"] > 1  # scaled up under load
    assert r["scaled_down_to_min_after_load_s"] is not None  # and back down after it
    assert r["placement_end"]["SafetyChecker"]["replicas"] == 1

    assert r["load"]["requests"] >= 100 and r["load_disallowed"] == {}  # every request succeeded while scaling
    assert r["trickle"]["requests"] >= 3 and r["trickle_disallowed"] == {}
    assert r["load"]["by_route"]["generate"]["200"] > 0
    assert r["unchecked_images_out"] == 0 and r["problems"] == []
    released = min(r["load"]["images_out"], 256) + min(r["trickle"]["images_out"], 256)  # all, up to 256 per phase
    assert r["verified_images"] == released > 0  # recomputed in-process from the released PNGs: same verdicts
