"""preStop hook of every Ray worker container: drain this Ray node, then wait until its Serve replicas are gone.

    python -m k8s.prestop --deadline-s 330

1. Asks the GCS to drain the node (the call ``ray drain-node`` makes, reason ``PREEMPTION``, with the deadline), so
   the cluster schedules nothing new on it and Serve starts each of its replicas elsewhere before stopping this
   one, letting in-flight requests finish within the deployment's ``graceful_shutdown_timeout_s``.
2. Polls the GCS until no Serve replica actor on this node is alive (or the deadline passes).

It always exits 0, so a hook that cannot reach the GCS never blocks the pod's termination: the kubelet kills the
container after ``terminationGracePeriodSeconds`` anyway, and the drain only makes that kill lose no work. Each step
prints one line. Token authentication (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``, set by KubeRay in every Ray container)
is picked up from the environment by Ray's own GCS client; a cluster without it works the same.

``--node-id`` defaults to the one alive Ray node whose IP is this machine's (one Ray node per pod); ``--address``
defaults to the cluster this machine's Ray node belongs to (``RAY_ADDRESS``, else the node's own record).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

REPLICA_CLASS_PREFIX = "ServeReplica:"  # class name of every Serve replica actor: ServeReplica:<app>:<deployment>
RPC_TIMEOUT_S = 10


def say(message: str) -> None:
    print(f"prestop: {message}", flush=True)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m k8s.prestop", description=__doc__.splitlines()[0])
    parser.add_argument("--deadline-s", type=positive, required=True, help="drain deadline, seconds from now")
    parser.add_argument("--address", default=None, help="the cluster's GCS address (default: this node's cluster)")
    parser.add_argument("--node-id", default=None, help="hex id of the Ray node to drain (default: this node)")
    parser.add_argument("--poll-s", type=positive, default=2.0, help="seconds between checks for replicas")
    args = parser.parse_args(argv)
    if args.node_id is not None:
        try:
            bytes.fromhex(args.node_id)
        except ValueError:
            parser.error(f"--node-id must be a hex Ray node id, got {args.node_id!r}")
    return args


def gcs_client(address: str | None) -> Any:
    from ray._private import services
    from ray._raylet import GcsClient

    return GcsClient(address=services.canonicalize_bootstrap_address_or_die(address))


def own_node_id(gcs: Any) -> str:
    """The alive Ray node on this machine's IP; refuses to guess where there is not exactly one."""
    import ray
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    ip = ray.util.get_node_ip_address()
    nodes = gcs.get_all_node_info(timeout=RPC_TIMEOUT_S, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
    here = [nid.hex() for nid, n in nodes.items() if n.node_manager_address == ip]
    if len(here) != 1:
        raise LookupError(f"{len(here)} alive Ray nodes have this machine's IP {ip}; pass --node-id")
    return here[0]


def drain(gcs: Any, node_id: str, deadline_s: float) -> tuple[bool, str]:
    """What ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` sends: (accepted, rejection message)."""
    from ray.core.generated import autoscaler_pb2

    deadline_ms = time.time_ns() // 1_000_000 + int(deadline_s * 1000)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    return gcs.drain_node(node_id, reason, "pod terminating (k8s.prestop)", deadline_ms)


def replicas_on(gcs: Any, node_id: str) -> list[str]:
    """Names of the Serve replica actors on the node that are not dead (alive, pending or restarting)."""
    from ray.core.generated.gcs_pb2 import ActorTableData

    async def fetch() -> dict:
        return await asyncio.wrap_future(gcs.async_get_all_actor_info(timeout=RPC_TIMEOUT_S))

    dead = ActorTableData.ActorState.Value("DEAD")
    return sorted(
        a.name or a.class_name
        for a in asyncio.run(fetch()).values()
        if a.class_name.startswith(REPLICA_CLASS_PREFIX) and a.state != dead and a.address.node_id.hex() == node_id
    )


def run(args: argparse.Namespace) -> str:
    """Drain and wait; returns how it ended: "drained", "rejected" or "deadline"."""
    end = time.monotonic() + args.deadline_s
    gcs = gcs_client(args.address)
    node_id = args.node_id or own_node_id(gcs)
    accepted, why = drain(gcs, node_id, args.deadline_s)
    if not accepted:
        say(f"drain of node {node_id} rejected by the GCS: {why}")
        return "rejected"
    say(f"node {node_id} draining (reason PREEMPTION, deadline in {args.deadline_s:g}s)")
    last = None
    while True:
        try:
            left = replicas_on(gcs, node_id)
        except Exception as exc:  # noqa: BLE001 - a GCS restart mid-drain: keep waiting until the deadline
            say(f"could not list actors ({type(exc).__name__}: {exc}); retrying")
            left = last if last is not None else ["?"]
        if not left:
            say(f"no Serve replica left on node {node_id}")
            return "drained"
        if left != last:
            say(f"{len(left)} Serve replica(s) still on the node: {', '.join(left)}")
            last = left
        if time.monotonic() + args.poll_s > end:
            say(f"deadline of {args.deadline_s:g}s reached with {len(left)} replica(s) on the node")
            return "deadline"
        time.sleep(args.poll_s)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse printed why; a manifest error must not fail the pod's termination either
        if exc.code:
            say("bad arguments: nothing drained")
            return 0
        raise
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001 - never block the pod's termination
        say(f"gave up: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
