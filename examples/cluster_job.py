"""A job that spreads over a multi-node meshray cluster and reports where it ran.

This is the compose setup's driver (`docker compose run --rm driver`), and
also works on bare machines or on one node:

    MESHRAY_ADDRESS=etcd1:2379,etcd2:2379,etcd3:2379 MESHRAY_EXPECT_NODES=2 \\
        python examples/cluster_job.py
    python examples/cluster_job.py            # no address: a private 1-node cluster

It waits until MESHRAY_EXPECT_NODES nodes with CPUs are alive, spreads tasks
over them, moves a large object between nodes, calls an actor from every
node, and exits non-zero if the work did not actually span the nodes -- so a
broken cluster fails loudly instead of quietly running everything locally.
Runs unchanged on Ray if you swap the import for `import ray`.
"""
from __future__ import annotations

import collections
import os
import socket
import sys
import time

import meshray as ray

EXPECT_NODES = int(os.environ.get("MESHRAY_EXPECT_NODES", "1"))
WAIT_S = float(os.environ.get("MESHRAY_WAIT_NODES_S", "120"))


def worker_nodes() -> list[dict]:
    """Alive nodes that can run CPU tasks (a driver-only node offers 0 CPUs)."""
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def wait_for_nodes(count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = worker_nodes()
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            sys.exit(f"only {len(nodes)} of the {count} expected worker nodes joined within "
                     f"{timeout:.0f}s; is `docker compose up --scale node={count}` running?")
        time.sleep(1.0)


@ray.remote(num_cpus=1)
def where(index: int) -> tuple[int, str, str]:
    time.sleep(0.2)  # long enough that one node cannot take every task first
    return index, socket.gethostname(), ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
def checksum(blob: bytes) -> tuple[int, str]:
    return sum(blob[::4096]), ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class Tally:
    def __init__(self):
        self.counts = collections.Counter()

    def add(self, node_id: str) -> int:
        self.counts[node_id] += 1
        return sum(self.counts.values())

    def snapshot(self) -> dict:
        return dict(self.counts)


@ray.remote(num_cpus=1)
def report_to(tally, index: int) -> int:
    return ray.get(tally.add.remote(ray.get_runtime_context().get_node_id()))


def main() -> int:
    address = os.environ.get("MESHRAY_ADDRESS") or None
    ray.init(address=address)
    try:
        nodes = wait_for_nodes(EXPECT_NODES, WAIT_S)
        print(f"{len(nodes)} worker node(s): " + ", ".join(n["NodeID"][:12] for n in nodes))

        refs = [where.options(scheduling_strategy="SPREAD").remote(i)
                for i in range(4 * len(nodes))]
        placements = ray.get(refs)
        by_node = collections.Counter(node for _i, _host, node in placements)
        hosts = {node: host for _i, host, node in placements}
        for node, count in sorted(by_node.items()):
            print(f"  {count:3d} tasks on node {node[:12]} ({hosts[node]})")

        blob = bytes(range(256)) * (32 * 1024)  # 8 MiB: travels through the object store
        blob_ref = ray.put(blob)
        sums = ray.get([checksum.options(scheduling_strategy="SPREAD").remote(blob_ref)
                        for _ in nodes])
        assert all(value == sum(blob[::4096]) for value, _node in sums), "object corrupted"
        print(f"  8 MiB object read on {len({node for _v, node in sums})} node(s), intact")

        tally = Tally.remote()
        ray.get([report_to.options(scheduling_strategy="SPREAD").remote(tally, i)
                 for i in range(2 * len(nodes))])
        print(f"  actor calls came from {len(ray.get(tally.snapshot.remote()))} node(s)")

        if len(by_node) < min(EXPECT_NODES, len(nodes)):
            print(f"FAIL: tasks ran on {len(by_node)} node(s), expected {EXPECT_NODES}")
            return 1
        print("OK")
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
