"""A simulated three-node cluster (a CPU head; a generation and a checking worker, labelled ``diffguard.io/pool`` as
the KubeRay worker groups are, advertising logical GPUs) running the production-shaped Serve config: production.yaml's
label selectors keep Generators on generation nodes and checkers on checking nodes at the start, at the peak and after
scale-down, although each pool has GPUs to spare for the other's replicas; the checker scales up under load and back
down after it, every request succeeding and audited meanwhile (driver: ``tests/reliability/multinode.py``).

The cluster runs in a child process: one Ray per process, and this session's own Ray (``ray_cluster``) may be up.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import run_driver

pytestmark = pytest.mark.slow  # deselected by `make test-fast`


def test_multinode_placement_and_autoscaling(tmp_path):
    out = tmp_path / "multinode.json"
    r = run_driver("tests.reliability.multinode", out, "--load-s", "30")
    print({k: v for k, v in r.items() if k != "replica_timeline"})

    selects = {"Generator": "generation", "SafetyChecker": "checking"}  # deployment -> pool (issue 31's contract)
    for moment in ("placement_start", "placement_peak", "placement_end"):
        p = r[moment]
        assert p["nodes"] == 3 and p["gpu_nodes"] == 2
        assert {k: v["nodes"] for k, v in p["pools"].items()} == {"unlabelled": 1, "generation": 1, "checking": 1}
        gen, chk = p["Generator"], p["SafetyChecker"]
        assert gen["gpus_per_replica"] == 1 and chk["gpus_per_replica"] == 0.25  # as production.yaml says
        for name, pool in selects.items():  # production.yaml's own selectors, and every replica in that pool
            assert p[name]["label_selector"] == {"diffguard.io/pool": pool}
            assert p[name]["pools"] == [pool] * p[name]["replicas"], (moment, name, p[name])
        assert gen["replicas"] == r["generators"] >= 2  # production's min_replicas, all placed
        # the cluster's own GPU accounting: the generation pool's GPUs are the Generators' alone (no checker holds a
        # slice there, not even one starting), the checking pool's the checkers'
        assert p["pools"]["generation"]["gpus_in_use"] == gen["replicas"]
        assert p["pools"]["unlabelled"]["gpus_total"] == 0
        used = gen["replicas"] + chk["replicas"] * 0.25
        if moment == "placement_peak":
            assert p["gpus_in_use"] >= used  # a replica still starting already holds its share
            assert p["pools"]["checking"]["gpus_in_use"] >= chk["replicas"] * 0.25
        else:
            assert p["gpus_in_use"] == used and p["pools"]["checking"]["gpus_in_use"] == chk["replicas"] * 0.25
            assert gen["not_running"] == chk["not_running"] == []
    # the selectors are what kept the pools apart: at the peak the generation pool still had GPU room for every
    # checker, and the checking pool a whole GPU a Generator could have taken (Serve spreads replicas by default)
    peak = r["placement_peak"]["pools"]
    assert peak["generation"]["gpus_total"] - peak["generation"]["gpus_in_use"] >= r["max_replicas"] * 0.25
    assert peak["checking"]["gpus_total"] - peak["checking"]["gpus_in_use"] >= 1

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
