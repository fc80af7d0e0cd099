"""Head loss and a node drain on a GCS-fault-tolerant cluster of ``ray start`` processes (GCS state in a loopback
``redis-server``), running the production-shaped Serve config with HTTP load on a worker node's proxy throughout
(driver: ``tests/reliability/head_loss.py``).

The cluster runs in a child process: one Ray per process, and this session's own Ray (``ray_cluster``) may be up.
"""

from __future__ import annotations

import shutil

import pytest

from tests.integration.conftest import run_driver

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

ANSWERED = {"200", "503"}  # a 503 carries no image bytes (load.audit counts any as a problem)


def check_load(load: dict) -> None:
    assert load["requests"] > 0 and load["disallowed"] == {}, load["statuses"]  # no 5xx but 503, no dropped connection
    assert load["unchecked_images_out"] == 0 and load["missing_retry_after"] == 0 and load["problems"] == []
    assert load["by_route"]["moderate"].get("200", 0) > 0 and load["by_route"]["generate"].get("200", 0) > 0
    # every /v1/moderate 200 the prober got carries the in-process checker's verdict for the PNG it sent
    assert load["prober_mismatched"] == 0 and load["prober"]["verified"] > 0
    assert set(load["prober"]["statuses"]) <= ANSWERED
    assert load["verified_images"] == min(load["images_out"], 256) > 0  # released generations scored again in-process
    during = load["in_window"]
    assert during["answered"] > 0 and set(during["statuses"]) <= ANSWERED, during  # answered while it happened


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server (apt-get install redis-server)")
def test_head_loss_and_drain(tmp_path):
    out = tmp_path / "head_loss.json"
    r = run_driver("tests.reliability.head_loss", out)
    print({k: v for k, v in r["head_loss"].items() if k != "after"})
    for phase in ("head_loss_load", "drain_load"):
        print(phase, {k: v for k, v in r[phase].items() if k != "in_window"}, r[phase]["in_window"]["answered"])
    print(r["drain"])

    # placed as the config's label selectors say: generators on generation nodes, checkers on checking nodes
    assert set(r["placement"]["Generator"]) == {"generation"} and set(r["placement"]["SafetyChecker"]) == {"checking"}

    loss = r["head_loss"]
    assert loss["controller_recovered_after_head_up_s"] is not None, loss  # recovery_error, after: what it saw
    assert {"gcs_server", "raylet"} <= set(loss["killed"])  # the whole head went, not only a process of it
    assert any(name.startswith("ray::ServeController") for name in loss["killed"])
    assert set(loss["replicas_on_head_before"].values()) == {0}  # the head runs no replica: all live on workers
    assert loss["same_worker_replicas"]  # the controller recovered the app from Redis: nothing redeployed
    check_load(r["head_loss_load"])

    drain = r["drain"]
    assert drain["drained_node_pool"] == "checking" and drain["hook_rc"] == 0
    assert drain["hook_output"][-1].startswith("prestop: no Serve replica left")  # drained before its deadline
    assert drain["deadline_s"] == max(r["graceful_shutdown_timeout_s"].values())  # the longest configured grace
    assert drain["replicas_left_on_drained_node"] == 0 and drain["checker_after"] == ["checking"]
    check_load(r["drain_load"])
