"""k8s.prestop against a fake GCS: what it drains, which actors it waits for, and that it never fails the pod's
termination (the real drain runs in tests/integration/test_head_loss.py)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from k8s import prestop

NODE, OTHER = "aa" * 28, "bb" * 28
ALIVE, DEAD = 2, 4  # ray.core.generated.gcs_pb2.ActorTableData.ActorState


def actor(name: str, node: str = NODE, state: int = ALIVE, cls: str = "ServeReplica:diffguard:SafetyChecker"):
    return SimpleNamespace(name=name, class_name=cls, state=state, address=SimpleNamespace(node_id=bytes.fromhex(node)))


class FakeGcs:
    """Answers drain_node once, then one actor table per poll (the last one repeated)."""

    def __init__(self, tables: list[list[SimpleNamespace]], accept: bool = True):
        self.tables, self.accept, self.drained = tables, accept, []

    def drain_node(self, node_id, reason, message, deadline_ms):
        self.drained.append((node_id, reason, deadline_ms))
        return self.accept, "" if self.accept else "node is the head"

    def async_get_all_actor_info(self, timeout=None):
        table = self.tables.pop(0) if len(self.tables) > 1 else self.tables[0]
        future = Future()
        future.set_result({i: a for i, a in enumerate(table)})
        return future

    def get_all_node_info(self, timeout=None, state_filter=None):
        return {bytes.fromhex(NODE): SimpleNamespace(node_manager_address="10.0.0.7")}


def run(monkeypatch, gcs: FakeGcs, *argv: str) -> str:
    monkeypatch.setattr(prestop, "gcs_client", lambda address: gcs)
    return prestop.run(prestop.parse_args(["--deadline-s", "5", "--poll-s", "0.01", *argv]))


def test_drains_with_preemption_and_waits_for_this_nodes_replicas_only(monkeypatch, capsys):
    from ray.core.generated import autoscaler_pb2

    gcs = FakeGcs(
        [
            [actor("ingress"), actor("checker"), actor("elsewhere", node=OTHER), actor("x", cls="ProxyActor")],
            [actor("checker"), actor("gone", state=DEAD)],
            [actor("elsewhere", node=OTHER)],
        ]
    )
    assert run(monkeypatch, gcs, "--node-id", NODE) == "drained"
    ((node_id, reason, deadline_ms),) = gcs.drained
    assert node_id == NODE and reason == autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    assert deadline_ms > 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "prestop: 2 Serve replica(s) still on the node: checker, ingress"  # not the proxy, not OTHER
    assert lines[-1] == f"prestop: no Serve replica left on node {NODE}"


def test_stops_at_the_deadline_and_reports_a_rejection(monkeypatch):
    stuck = FakeGcs([[actor("checker")]])
    assert run(monkeypatch, stuck, "--node-id", NODE, "--deadline-s", "0.05") == "deadline"
    assert run(monkeypatch, FakeGcs([[]], accept=False), "--node-id", NODE) == "rejected"


def test_defaults_to_the_node_on_this_machines_ip(monkeypatch):
    monkeypatch.setattr("ray.util.get_node_ip_address", lambda: "10.0.0.7")
    gcs = FakeGcs([[]])
    assert run(monkeypatch, gcs) == "drained" and gcs.drained[0][0] == NODE
    monkeypatch.setattr("ray.util.get_node_ip_address", lambda: "10.0.0.8")
    with pytest.raises(LookupError, match="0 alive Ray nodes have this machine's IP 10.0.0.8; pass --node-id"):
        run(monkeypatch, FakeGcs([[]]))


def test_always_exits_0(monkeypatch, capsys):
    def unreachable(address):
        raise ConnectionError("GCS at 10.0.0.1:6379 unreachable")

    monkeypatch.setattr(prestop, "gcs_client", unreachable)
    assert prestop.main(["--deadline-s", "30"]) == 0
    assert "prestop: gave up: ConnectionError: GCS at 10.0.0.1:6379 unreachable" in capsys.readouterr().out
    for bad in (["--deadline-s", "0"], ["--deadline-s", "30", "--node-id", "not-hex"], []):
        assert prestop.main(bad) == 0
        captured = capsys.readouterr()
        assert "prestop: bad arguments: nothing drained" in captured.out and "error:" in captured.err
