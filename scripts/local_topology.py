"""The docker-compose topology as plain processes, with faults.

Starts a 3-member etcd cluster and 3 meshray nodes on this machine (loopback
ports), runs a job across them, and while the job runs SIGKILLs one node
that the driver does not sit on and the etcd leader. The job must still
finish with every result correct. Exit code 0 means it did.

    python scripts/local_topology.py [--nodes 3] [--tasks 60]

Network namespaces (one address per host, as in the compose file) are not
implemented yet: the topology runs on loopback ports.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run(nodes: int = 3, tasks: int = 60) -> int:
    from meshray.coordination.embedded import EtcdCluster
    from meshray.testing import Cluster

    base = tempfile.mkdtemp(prefix="meshray-topology-")
    etcd = EtcdCluster(os.path.join(base, "etcd"), size=3)
    cluster = None
    try:
        endpoints = ",".join(etcd.endpoints)
        print(f"etcd members: {endpoints}")
        cluster = Cluster(initialize_head=False, etcd_endpoints=endpoints)
        started = [cluster.add_node(num_cpus=1) for _ in range(nodes)]
        print("nodes:", ", ".join(n.node_id[:12] for n in started))
        os.environ["MESHRAY_PREFERRED_NODE"] = started[0].node_id
        ray = cluster.connect()

        @ray.remote(num_cpus=1, max_retries=5)
        def square(i):
            time.sleep(0.1)
            return i * i, ray.get_runtime_context().get_node_id()

        refs = [square.remote(i) for i in range(tasks)]
        victim = started[-1]

        def faults():
            time.sleep(1.0)
            print(f"fault: SIGKILL node {victim.node_id[:12]}")
            cluster.remove_node(victim, allow_graceful=False)
            leader = etcd.leader_index()
            print(f"fault: SIGKILL etcd member {leader} (the leader)")
            etcd.kill_member(leader)

        injector = threading.Thread(target=faults)
        injector.start()
        results = ray.get(refs, timeout=240)
        injector.join()
        wrong = [i for i, (value, _node) in enumerate(results) if value != i * i]
        used = {node for _value, node in results}
        print(f"{len(results)} results from {len(used)} node(s); wrong: {wrong}")
        after = ray.get(square.remote(7), timeout=120)
        print(f"after the faults a new task ran on {after[1][:12]}")
        ok = not wrong and len(results) == tasks and after[0] == 49 and after[1] != victim.node_id
        print("OK" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        os.environ.pop("MESHRAY_PREFERRED_NODE", None)
        if cluster is not None:
            cluster.shutdown()
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=60)
    args = parser.parse_args(argv)
    return run(args.nodes, args.tasks)


if __name__ == "__main__":
    sys.exit(main())
